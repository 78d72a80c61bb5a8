//! `kv_transfer_params` at the HTTP boundary: a request's params become its
//! [`KvRole`], and a prefill leg's [`Handoff`] becomes the params of its response
//! (vLLM's exact dict, reference §1.3.2, plus tandem's lease secret, expiry and
//! signature). A decode leg is pulled only if its params carry a valid signature of
//! this cluster: nothing connects anywhere on the word of an unsigned dict.

use serde_json::{Value, json};
use tandem_protocol::openai::ApiError;
use tandem_protocol::pd::KvTransferParams;

use crate::metrics as names;
use crate::transfer::auth::{self, ClusterSecret, SignedParams};
use crate::transfer::puller::FailureKind;
use crate::transfer::{Handoff, KvRole, LoadFailurePolicy, RemotePrefill};

/// How this worker takes part in the hand-off.
#[derive(Debug, Clone)]
pub struct HandoffInfo {
    pub engine_id: String,
    /// Where decode workers reach this worker's hand-off listener (`remote_host` and
    /// `remote_port`); `None` when it has none, and so cannot be a prefill leg.
    pub listener: Option<(String, u16)>,
    pub load_failure_policy: LoadFailurePolicy,
    /// Signs the params this worker issues and checks those it is given; without it
    /// this worker refuses decode legs.
    pub secret: Option<ClusterSecret>,
}

/// How many prompts a request has, and how many sequences (choices, or `best_of`
/// candidates) each runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestShape {
    pub prompts: usize,
    pub sequences_per_prompt: usize,
}

impl RequestShape {
    pub const ONE: Self = Self {
        prompts: 1,
        sequences_per_prompt: 1,
    };
}

/// The role of a request with these params. `stream` and `shape` describe the
/// request: a streamed answer has nowhere to put the params (as in vLLM), so a
/// streamed prefill leg runs as an ordinary request; a prefill leg computes one
/// sequence; a decode leg takes one prompt, which its first sequence pulls and the
/// others take from the prefix cache.
pub fn kv_role(
    params: Option<&KvTransferParams>,
    stream: bool,
    shape: RequestShape,
    info: Option<&HandoffInfo>,
) -> Result<KvRole, ApiError> {
    let Some(params) = params else {
        return Ok(KvRole::Local);
    };
    match (params.is_remote_decode(), params.is_remote_prefill()) {
        (false, false) => Ok(KvRole::Local),
        (true, true) => Err(invalid(
            "do_remote_decode and do_remote_prefill cannot both be true",
        )),
        (true, false) => {
            if shape != RequestShape::ONE {
                return Err(invalid(
                    "a prefill leg (do_remote_decode) takes one prompt and one choice (n = 1); \
                     send one request per prompt",
                ));
            }
            let serves_reads = info.is_some_and(|i| i.listener.is_some());
            if stream || !serves_reads {
                return Ok(KvRole::Local);
            }
            Ok(KvRole::RemoteDecode)
        }
        (false, true) => remote_prefill(params, shape.prompts, info),
    }
}

fn remote_prefill(
    params: &KvTransferParams,
    prompts: usize,
    info: Option<&HandoffInfo>,
) -> Result<KvRole, ApiError> {
    let Some(secret) = info.and_then(|i| i.secret.as_ref()) else {
        return Err(invalid(&format!(
            "this worker has no KV secret, so it pulls no KV from other workers: \
             {}",
            auth::HOW_TO_CONFIGURE
        )));
    };
    let policy = info.map_or(LoadFailurePolicy::Fail, |i| i.load_failure_policy);
    let source = match remote_source(params, prompts) {
        Ok(source) => source,
        Err(problem) => return fall_back(policy, FailureKind::InvalidParams, &problem),
    };
    match auth::verify_params(secret, &source, params, auth::now_unix()) {
        Ok(()) => Ok(KvRole::RemotePrefill(source)),
        Err(rejection) => fall_back(policy, FailureKind::Unauthenticated, &rejection.to_string()),
    }
}

/// Params that cannot be pulled: the client's error under `fail`, a local prefill
/// (logged and counted) under `recompute`.
fn fall_back(
    policy: LoadFailurePolicy,
    kind: FailureKind,
    problem: &str,
) -> Result<KvRole, ApiError> {
    match policy {
        LoadFailurePolicy::Fail => Err(invalid(problem)),
        LoadFailurePolicy::Recompute => {
            let kind = kind.label();
            tracing::warn!(kind, %problem, "unusable kv_transfer_params: computing the prompt locally");
            metrics::counter!(names::KV_TRANSFER_FAILURES_TOTAL, names::KIND => kind).increment(1);
            metrics::counter!(names::KV_LOAD_RECOMPUTES_TOTAL).increment(1);
            Ok(KvRole::Local)
        }
    }
}

/// Where to pull from, or what is missing.
fn remote_source(params: &KvTransferParams, prompts: usize) -> Result<RemotePrefill, String> {
    if prompts > 1 {
        return Err("a decode leg (do_remote_prefill) takes one prompt".into());
    }
    RemotePrefill::from_params(params).map_err(|e| e.to_string())
}

fn invalid(message: &str) -> ApiError {
    ApiError::invalid_param("kv_transfer_params", message)
}

/// The prefill leg's answer: where the decode worker finds the prompt's KV, signed
/// under the cluster secret (`None` without a listener or a secret).
pub fn response_params(handoff: &Handoff, info: &HandoffInfo) -> Option<Value> {
    let (host, port) = info.listener.as_ref()?;
    let secret = info.secret.as_ref()?;
    let signed = SignedParams {
        engine_id: &info.engine_id,
        request_id: &handoff.remote_request_id,
        block_ids: &handoff.block_ids,
        host,
        port: *port,
        num_tokens: handoff.num_tokens as u64,
        expires_at: handoff.expires_at,
        lease_secret: &handoff.lease_secret,
    };
    let mut params = json!({
        "do_remote_prefill": true,
        "do_remote_decode": false,
        "remote_block_ids": [handoff.block_ids],
        "remote_engine_id": info.engine_id,
        "remote_request_id": handoff.remote_request_id,
        "remote_host": host,
        "remote_port": port,
        "tp_size": 1,
        "remote_num_tokens": handoff.num_tokens,
    });
    let tandem = [
        (auth::PARAM_LEASE_SECRET, json!(handoff.lease_secret)),
        (auth::PARAM_EXPIRES_AT, json!(handoff.expires_at)),
        (auth::PARAM_SIGNATURE, json!(signed.sign(secret))),
    ];
    let dict = params.as_object_mut()?;
    dict.extend(tandem.map(|(k, v)| (k.to_owned(), v)));
    Some(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The role of a non-streamed one-prompt, one-choice request with these params.
    fn decode_role(dict: Value, info: Option<&HandoffInfo>) -> Result<KvRole, ApiError> {
        kv_role(Some(&params(dict)), false, RequestShape::ONE, info)
    }

    fn secret() -> ClusterSecret {
        ClusterSecret::new(b"a test cluster secret", "test").unwrap()
    }

    fn info() -> HandoffInfo {
        HandoffInfo {
            engine_id: "e".into(),
            listener: Some(("10.0.0.5".into(), 5600)),
            load_failure_policy: LoadFailurePolicy::Fail,
            secret: Some(secret()),
        }
    }

    fn lenient() -> HandoffInfo {
        HandoffInfo {
            load_failure_policy: LoadFailurePolicy::Recompute,
            ..info()
        }
    }

    fn params(json: Value) -> KvTransferParams {
        serde_json::from_value(json).unwrap()
    }

    fn handoff() -> Handoff {
        Handoff {
            remote_request_id: "cmpl-R-0-1a2b3c4d".into(),
            block_ids: vec![12, 13, 14],
            num_tokens: 37,
            lease_secret: auth::new_lease_secret(),
            expires_at: auth::now_unix() + 30,
        }
    }

    /// What a prefill worker of this cluster answers, as the proxy copies it.
    fn decode_leg() -> Value {
        response_params(&handoff(), &info()).unwrap()
    }

    #[test]
    fn the_toy_proxy_prefill_dict_makes_a_prefill_leg() {
        let p = KvTransferParams::prefill_request();
        assert_eq!(
            kv_role(Some(&p), false, RequestShape::ONE, Some(&info())).unwrap(),
            KvRole::RemoteDecode
        );
        // Streamed, or on a worker without a listener: an ordinary request.
        assert_eq!(
            kv_role(Some(&p), true, RequestShape::ONE, Some(&info())).unwrap(),
            KvRole::Local
        );
        assert_eq!(
            kv_role(Some(&p), false, RequestShape::ONE, None).unwrap(),
            KvRole::Local
        );
        let two = RequestShape {
            prompts: 1,
            sequences_per_prompt: 2,
        };
        assert!(kv_role(Some(&p), false, two, Some(&info())).is_err());
    }

    #[test]
    fn a_signed_decode_dict_makes_a_decode_leg() {
        let role = kv_role(
            Some(&params(decode_leg())),
            true,
            RequestShape::ONE,
            Some(&info()),
        )
        .unwrap();
        let KvRole::RemotePrefill(source) = role else {
            panic!("{role:?}")
        };
        assert_eq!((source.host.as_str(), source.port), ("10.0.0.5", 5600));
        assert_eq!(source.block_ids, vec![12, 13, 14]);
        assert_eq!(source.lease_secret.len(), 32);
        // Several choices of one prompt share the pull; two prompts cannot.
        let choices = RequestShape {
            prompts: 1,
            sequences_per_prompt: 4,
        };
        let role = kv_role(Some(&params(decode_leg())), false, choices, Some(&info()));
        assert!(matches!(role, Ok(KvRole::RemotePrefill(_))), "{role:?}");
        let prompts = RequestShape {
            prompts: 2,
            sequences_per_prompt: 1,
        };
        assert!(kv_role(Some(&params(decode_leg())), false, prompts, Some(&info())).is_err());
    }

    #[test]
    fn incomplete_decode_dicts_follow_the_failure_policy() {
        for field in [
            "remote_block_ids",
            "remote_engine_id",
            "remote_request_id",
            "remote_host",
            "remote_port",
        ] {
            let mut dict = decode_leg();
            dict.as_object_mut().unwrap().remove(field);
            let err = decode_role(dict.clone(), Some(&info())).unwrap_err();
            assert_eq!(err.status(), 400);
            assert!(err.body().error.message.contains(field), "{err:?}");
            let role = decode_role(dict, Some(&lenient())).unwrap();
            assert_eq!(role, KvRole::Local);
        }
        let mut empty = decode_leg();
        empty["remote_block_ids"] = json!([[]]);
        assert!(decode_role(empty, Some(&info())).is_err());
        let mut tp2 = decode_leg();
        tp2["tp_size"] = json!(2);
        assert!(decode_role(tp2, Some(&info())).is_err());
    }

    #[test]
    fn unsigned_forged_or_expired_dicts_are_never_pulled() {
        let forged = [
            ("remote_host", json!("127.0.0.1")),
            ("remote_port", json!(22)),
            ("remote_engine_id", json!("someone-else")),
            ("remote_request_id", json!("cmpl-other-0-00000000")),
            ("remote_block_ids", json!([[12, 13]])),
            ("remote_num_tokens", json!(36)),
            ("tandem_lease_secret", json!("00")),
            ("tandem_expires_at", json!(u64::MAX)),
            ("tandem_signature", json!("00".repeat(32))),
        ];
        let mut cases: Vec<Value> = forged
            .into_iter()
            .map(|(field, value)| {
                let mut dict = decode_leg();
                dict[field] = value;
                dict
            })
            .collect();
        for key in [
            "tandem_signature",
            "tandem_expires_at",
            "tandem_lease_secret",
        ] {
            let mut dict = decode_leg();
            dict.as_object_mut().unwrap().remove(key);
            cases.push(dict);
        }
        let mut stale = handoff();
        stale.expires_at = auth::now_unix() - auth::CLOCK_SKEW_SECS - 5;
        cases.push(response_params(&stale, &info()).unwrap());
        for dict in cases {
            let err = decode_role(dict.clone(), Some(&info())).unwrap_err();
            assert_eq!(err.status(), 400, "{dict}");
            assert_eq!(
                err.body().error.param.as_deref(),
                Some("kv_transfer_params")
            );
            let message = &err.body().error.message;
            assert!(
                !message.contains("10.0.0.5") && !message.contains("127.0.0.1"),
                "{message}"
            );
            let role = decode_role(dict, Some(&lenient())).unwrap();
            assert_eq!(role, KvRole::Local);
        }
        // Signed under another cluster's secret.
        let other = HandoffInfo {
            secret: Some(ClusterSecret::new(b"another cluster's secret", "t").unwrap()),
            ..info()
        };
        let theirs = response_params(&handoff(), &other).unwrap();
        assert!(decode_role(theirs, Some(&info())).is_err());
    }

    #[test]
    fn a_worker_without_a_secret_refuses_decode_legs() {
        let unsecured = HandoffInfo {
            secret: None,
            ..lenient()
        };
        for info in [Some(&unsecured), None] {
            let err = decode_role(decode_leg(), info).unwrap_err();
            assert_eq!(err.status(), 400);
            assert_eq!(
                err.body().error.param.as_deref(),
                Some("kv_transfer_params")
            );
            assert!(
                err.body().error.message.contains("TANDEM_KV_SECRET"),
                "{err:?}"
            );
        }
        // Nor can it issue params (it cannot sign them).
        assert!(response_params(&handoff(), &unsecured).is_none());
    }

    #[test]
    fn response_params_have_vllms_keys_and_tandems_signature() {
        let value = response_params(&handoff(), &info()).unwrap();
        let mut keys: Vec<_> = value.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "do_remote_decode",
                "do_remote_prefill",
                "remote_block_ids",
                "remote_engine_id",
                "remote_host",
                "remote_num_tokens",
                "remote_port",
                "remote_request_id",
                "tandem_expires_at",
                "tandem_lease_secret",
                "tandem_signature",
                "tp_size"
            ]
        );
        assert_eq!(value["remote_block_ids"], json!([[12, 13, 14]]));
        // What the proxy copies into the decode leg parses back as one.
        let role = decode_role(value, Some(&info())).unwrap();
        assert!(matches!(role, KvRole::RemotePrefill(_)));
    }
}
