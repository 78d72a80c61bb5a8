use std::time::Duration;

use tandem_protocol::kv_events::{BlockStored, KvEvent, KvEventBatch};

use super::view::{CacheState, KvCacheView};
use crate::policy::PrefixLookup;

fn stored(hashes: &[u64], parent: Option<u64>, tokens: Vec<u32>, block_size: u32) -> KvEventBatch {
    let event = BlockStored::new(hashes.to_vec(), parent, tokens, block_size, "GPU");
    KvEventBatch {
        ts: 0.0,
        events: vec![KvEvent::BlockStored(event)],
        data_parallel_rank: Some(0),
    }
}

#[test]
fn each_worker_is_measured_in_its_own_block_size() {
    let view = KvCacheView::new(1000, Duration::from_secs(60));
    let (small, large, fresh) = (
        view.register("http://small"),
        view.register("http://large"),
        view.register("http://fresh"),
    );
    for live in [&small, &large, &fresh] {
        view.set_connected(live, true);
    }
    let prompt: Vec<u32> = (0..40).collect();
    // Blocks of 4: the first 24 tokens; blocks of 16: the first 32.
    view.apply(
        &small,
        0,
        &stored(&[1, 2, 3, 4, 5, 6], None, prompt[..24].to_vec(), 4),
    );
    view.apply(
        &large,
        0,
        &stored(&[9, 10], None, prompt[..32].to_vec(), 16),
    );
    let urls = [
        "http://small",
        "http://large",
        "http://fresh",
        "http://none",
    ];
    assert_eq!(
        view.cached_prefix_tokens(&urls, &prompt),
        vec![Some(24), Some(32), Some(0), None]
    );
    view.set_connected(&large, false);
    assert_eq!(view.cache_state("http://large"), CacheState::Disconnected);
    assert_eq!(
        view.cached_prefix_tokens(&urls[..2], &prompt),
        vec![Some(24), None]
    );
}

#[test]
fn a_gap_left_unfilled_makes_the_worker_stale_until_reset() {
    let view = KvCacheView::new(1000, Duration::from_secs(60));
    let live = view.register("http://w");
    view.set_connected(&live, true);
    let prompt: Vec<u32> = (0..8).collect();
    view.apply(&live, 0, &stored(&[1], None, prompt[..4].to_vec(), 4));
    view.apply(&live, 5, &stored(&[2], Some(1), prompt[4..].to_vec(), 4));
    assert_eq!(view.cache_state("http://w"), CacheState::Stale);
    assert_eq!(
        view.cached_prefix_tokens(&["http://w"], &prompt),
        vec![None]
    );
    view.reset(&live);
    assert_eq!(
        view.cached_prefix_tokens(&["http://w"], &prompt),
        vec![Some(0)]
    );
}

#[test]
fn routed_requests_without_events_make_the_cache_unknown() {
    let view = KvCacheView::new(1000, Duration::ZERO);
    let live = view.register("http://w");
    view.set_connected(&live, true);
    view.note_routed("http://w");
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(view.cache_state("http://w"), CacheState::EventsStopped);
    view.event_arrived(&live);
    assert_eq!(view.cache_state("http://w"), CacheState::Known);
    view.unregister("http://w");
    assert_eq!(view.cache_state("http://w"), CacheState::NotFollowed);
    view.note_routed("http://w");
}
