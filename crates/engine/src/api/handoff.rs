//! `kv_transfer_params` at the HTTP boundary: a request's params become its
//! [`KvRole`], and a prefill leg's [`Handoff`] becomes the params of its response
//! (vLLM's exact dict, reference §1.3.2).

use serde_json::{Value, json};
use tandem_protocol::openai::ApiError;
use tandem_protocol::pd::KvTransferParams;

use crate::metrics as names;
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
}

/// The role of a request with these params. `stream` and `prompts` describe the
/// request: a streamed answer has nowhere to put the params (as in vLLM), so a
/// streamed prefill leg runs as an ordinary request; a prefill leg takes one prompt.
pub fn kv_role(
    params: Option<&KvTransferParams>,
    stream: bool,
    prompts: usize,
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
            if prompts > 1 {
                return Err(invalid(
                    "a prefill leg (do_remote_decode) takes one prompt; send one request per prompt",
                ));
            }
            let serves_reads = info.is_some_and(|i| i.listener.is_some());
            if stream || !serves_reads {
                return Ok(KvRole::Local);
            }
            Ok(KvRole::RemoteDecode)
        }
        (false, true) => remote_prefill(params, prompts, info),
    }
}

fn remote_prefill(
    params: &KvTransferParams,
    prompts: usize,
    info: Option<&HandoffInfo>,
) -> Result<KvRole, ApiError> {
    let policy = info.map_or(LoadFailurePolicy::Fail, |i| i.load_failure_policy);
    match remote_source(params, prompts) {
        Ok(source) => Ok(KvRole::RemotePrefill(source)),
        Err(problem) => match policy {
            LoadFailurePolicy::Fail => Err(invalid(&problem)),
            LoadFailurePolicy::Recompute => {
                tracing::warn!(%problem, "unusable kv_transfer_params: computing the prompt locally");
                let kind = FailureKind::InvalidParams.label();
                metrics::counter!(names::KV_TRANSFER_FAILURES_TOTAL, names::KIND => kind)
                    .increment(1);
                metrics::counter!(names::KV_LOAD_RECOMPUTES_TOTAL).increment(1);
                Ok(KvRole::Local)
            }
        },
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

/// The prefill leg's answer: where the decode worker finds the prompt's KV.
pub fn response_params(handoff: &Handoff, info: &HandoffInfo) -> Option<Value> {
    let (host, port) = info.listener.as_ref()?;
    Some(json!({
        "do_remote_prefill": true,
        "do_remote_decode": false,
        "remote_block_ids": [handoff.block_ids],
        "remote_engine_id": info.engine_id,
        "remote_request_id": handoff.remote_request_id,
        "remote_host": host,
        "remote_port": port,
        "tp_size": 1,
        "remote_num_tokens": handoff.num_tokens,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> HandoffInfo {
        HandoffInfo {
            engine_id: "e".into(),
            listener: Some(("10.0.0.5".into(), 5600)),
            load_failure_policy: LoadFailurePolicy::Fail,
        }
    }

    fn params(json: Value) -> KvTransferParams {
        serde_json::from_value(json).unwrap()
    }

    fn decode_leg() -> Value {
        json!({"do_remote_prefill": true, "do_remote_decode": false,
            "remote_block_ids": [[4, 5]], "remote_engine_id": "p", "remote_request_id": "r",
            "remote_host": "127.0.0.1", "remote_port": 5600, "tp_size": 1})
    }

    #[test]
    fn the_toy_proxy_prefill_dict_makes_a_prefill_leg() {
        let p = KvTransferParams::prefill_request();
        assert_eq!(
            kv_role(Some(&p), false, 1, Some(&info())).unwrap(),
            KvRole::RemoteDecode
        );
        // Streamed, or on a worker without a listener: an ordinary request.
        assert_eq!(
            kv_role(Some(&p), true, 1, Some(&info())).unwrap(),
            KvRole::Local
        );
        assert_eq!(kv_role(Some(&p), false, 1, None).unwrap(), KvRole::Local);
        assert!(kv_role(Some(&p), false, 2, Some(&info())).is_err());
    }

    #[test]
    fn a_complete_decode_dict_makes_a_decode_leg() {
        let role = kv_role(Some(&params(decode_leg())), true, 1, Some(&info())).unwrap();
        let KvRole::RemotePrefill(source) = role else {
            panic!("{role:?}")
        };
        assert_eq!((source.host.as_str(), source.port), ("127.0.0.1", 5600));
        assert_eq!(source.block_ids, vec![4, 5]);
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
            let err = kv_role(Some(&params(dict.clone())), false, 1, Some(&info())).unwrap_err();
            assert_eq!(err.status(), 400);
            assert!(err.body().error.message.contains(field), "{err:?}");
            let lenient = HandoffInfo {
                load_failure_policy: LoadFailurePolicy::Recompute,
                ..info()
            };
            let role = kv_role(Some(&params(dict)), false, 1, Some(&lenient)).unwrap();
            assert_eq!(role, KvRole::Local);
        }
        let mut empty = decode_leg();
        empty["remote_block_ids"] = json!([[]]);
        assert!(kv_role(Some(&params(empty)), false, 1, Some(&info())).is_err());
        let mut tp2 = decode_leg();
        tp2["tp_size"] = json!(2);
        assert!(kv_role(Some(&params(tp2)), false, 1, Some(&info())).is_err());
    }

    #[test]
    fn response_params_have_vllms_keys() {
        let handoff = Handoff {
            remote_request_id: "cmpl-R-0-1a2b3c4d".into(),
            block_ids: vec![12, 13, 14],
            num_tokens: 37,
        };
        let value = response_params(&handoff, &info()).unwrap();
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
                "tp_size"
            ]
        );
        assert_eq!(value["remote_block_ids"], json!([[12, 13, 14]]));
        // What the proxy copies into the decode leg parses back as one.
        let role = kv_role(Some(&params(value)), false, 1, Some(&info())).unwrap();
        assert!(matches!(role, KvRole::RemotePrefill(_)));
    }
}
