//! `kv_transfer_params`: the per-request field of vLLM's prefill/decode protocol
//! (NixlConnector, reference §1.3). The proxy sends `{"do_remote_decode": true}` to the
//! prefill worker, which answers with where the prompt's KV is; the proxy copies that
//! answer verbatim into the decode worker's request.
//!
//! Every field is optional and unknown keys are kept (`extra`), so a dict passes
//! through a proxy unchanged.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The `kv_transfer_params` object of a request or a response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KvTransferParams {
    /// True on the prefill leg: keep the KV for a remote decode.
    pub do_remote_decode: Option<bool>,
    /// True on the decode leg: the KV was computed remotely, pull it.
    pub do_remote_prefill: Option<bool>,
    pub remote_engine_id: Option<String>,
    pub remote_block_ids: Option<RemoteBlockIds>,
    pub remote_request_id: Option<String>,
    pub remote_host: Option<String>,
    pub remote_port: Option<u16>,
    pub tp_size: Option<u64>,
    pub remote_num_tokens: Option<u64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `remote_block_ids`: one list per KV-cache group (vLLM since 2026-03), or the older
/// flat list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RemoteBlockIds {
    PerGroup(Vec<Vec<u32>>),
    Flat(Vec<u32>),
}

impl RemoteBlockIds {
    /// The lists per KV-cache group (a flat list is one group).
    pub fn groups(&self) -> Vec<&[u32]> {
        match self {
            RemoteBlockIds::PerGroup(groups) => groups.iter().map(Vec::as_slice).collect(),
            RemoteBlockIds::Flat(ids) => vec![ids.as_slice()],
        }
    }
}

impl KvTransferParams {
    /// What a proxy sends to the prefill worker (the toy proxy's exact dict).
    pub fn prefill_request() -> Self {
        Self {
            do_remote_decode: Some(true),
            do_remote_prefill: Some(false),
            ..Self::default()
        }
    }

    pub fn is_remote_decode(&self) -> bool {
        self.do_remote_decode == Some(true)
    }

    pub fn is_remote_prefill(&self) -> bool {
        self.do_remote_prefill == Some(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_answer_parses_and_round_trips_with_unknown_keys() {
        // The shape of reference §1.3.2, plus a key from a later vLLM.
        let answer = serde_json::json!({
            "do_remote_prefill": true,
            "do_remote_decode": false,
            "remote_block_ids": [[12, 13, 14]],
            "remote_engine_id": "3c1e-uuid",
            "remote_request_id": "cmpl-R-0-1a2b3c4d",
            "remote_host": "10.0.0.5",
            "remote_port": 5600,
            "tp_size": 1,
            "remote_num_tokens": 37,
            "remote_blocks_expiry_time": null
        });
        let params: KvTransferParams = serde_json::from_value(answer.clone()).unwrap();
        assert!(params.is_remote_prefill());
        assert_eq!(
            params.remote_block_ids.as_ref().unwrap().groups(),
            vec![&[12, 13, 14][..]]
        );
        assert_eq!(params.remote_port, Some(5600));
        assert_eq!(serde_json::to_value(&params).unwrap(), answer);
    }

    #[test]
    fn flat_block_ids_of_older_versions_are_one_group() {
        let params: KvTransferParams =
            serde_json::from_str(r#"{"do_remote_prefill":true,"remote_block_ids":[1,2]}"#).unwrap();
        assert_eq!(params.remote_block_ids.unwrap().groups(), vec![&[1, 2][..]]);
    }

    #[test]
    fn the_proxy_dict_for_the_prefill_leg() {
        let dict = serde_json::to_value(KvTransferParams::prefill_request()).unwrap();
        assert_eq!(
            dict,
            serde_json::json!({"do_remote_decode": true, "do_remote_prefill": false,
                "remote_engine_id": null, "remote_block_ids": null, "remote_request_id": null,
                "remote_host": null, "remote_port": null, "tp_size": null,
                "remote_num_tokens": null})
        );
    }
}
