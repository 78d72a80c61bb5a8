//! Kernel correctness: every weight format's matmul (quantized and GEMM paths) against a
//! naive f32 reference, QMatrix validation, the thread pool's guarantees, and the ops.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tandem_engine::kernels::ops::{self, RopeTable};
use tandem_engine::kernels::{
    GEMM_MIN_TOKENS, GgmlDType, KernelError, Linear, MatmulPath, QMatrix, ThreadPool, gemm_pays,
    matmul, matmul_many, matmul_many_with,
};

const ALL_DTYPES: [GgmlDType; 15] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q8_1,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q8K,
];

/// Deterministic values in [-1, 1).
fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// y[t, r] = Σ_c x[t, c] · w[r, c] in f64.
fn reference_matmul(w: &[f32], rows: usize, cols: usize, x: &[f32], n_tokens: usize) -> Vec<f32> {
    let mut y = vec![0f32; n_tokens * rows];
    for t in 0..n_tokens {
        for r in 0..rows {
            let dot: f64 = (0..cols)
                .map(|c| f64::from(x[t * cols + c]) * f64::from(w[r * cols + c]))
                .sum();
            y[t * rows + r] = dot as f32;
        }
    }
    y
}

/// ‖a − b‖ / ‖b‖.
fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

/// Tolerance for the quantized path: activations are quantized to the weights' dot type
/// (8-bit for the block formats, bf16 for BF16); F32/F16 keep f32 activations.
fn quantized_path_tolerance(dtype: GgmlDType) -> f64 {
    match dtype {
        GgmlDType::F32 | GgmlDType::F16 => 1e-5,
        _ => 1e-2,
    }
}

fn check_matmul(pool: &ThreadPool, dtype: GgmlDType, rows: usize, cols: usize, n_tokens: usize) {
    let w = QMatrix::from_f32(dtype, rows, cols, &pseudo_random(rows * cols, 1)).unwrap();
    let dequantized = w.dequantize();
    let x = pseudo_random(n_tokens * cols, 2 + n_tokens as u64);
    let expected = reference_matmul(&dequantized, rows, cols, &x, n_tokens);

    let linear = Linear::new(w, false).with_dense();
    for path in [MatmulPath::Quantized, MatmulPath::Gemm, MatmulPath::Auto] {
        let mut y = vec![f32::NAN; n_tokens * rows];
        matmul_many_with(pool, &[&linear], &x, n_tokens, &mut [&mut y], path).unwrap();
        let gemm = match path {
            MatmulPath::Quantized => false,
            MatmulPath::Gemm => true,
            MatmulPath::Auto => gemm_pays(dtype, n_tokens),
        };
        let tolerance = if gemm {
            1e-5
        } else {
            quantized_path_tolerance(dtype)
        };
        let err = relative_error(&y, &expected);
        assert!(
            err < tolerance,
            "{dtype:?} {path:?}, {n_tokens} tokens: relative error {err}"
        );
    }
    let mut y = vec![f32::NAN; n_tokens * rows];
    matmul(
        pool,
        &Linear::new(linear.qmatrix().clone(), false),
        &x,
        n_tokens,
        &mut y,
    )
    .unwrap();
    let err = relative_error(&y, &expected);
    assert!(
        err < quantized_path_tolerance(dtype),
        "{dtype:?} without dense copy: {err}"
    );
}

#[test]
fn dense_copies_only_where_gemm_pays() {
    let q = |dtype| QMatrix::from_f32(dtype, 8, 256, &pseudo_random(8 * 256, 3)).unwrap();
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        assert!(!Linear::new(q(dtype), true).has_dense());
        assert!(!gemm_pays(dtype, 4096));
    }
    for dtype in [
        GgmlDType::Q4K,
        GgmlDType::Q6K,
        GgmlDType::F16,
        GgmlDType::F32,
    ] {
        assert!(Linear::new(q(dtype), true).has_dense());
        assert!(!Linear::new(q(dtype), false).has_dense());
        assert!(gemm_pays(dtype, GEMM_MIN_TOKENS) && !gemm_pays(dtype, GEMM_MIN_TOKENS - 1));
    }
}

#[test]
fn matmul_matches_reference_for_every_dtype_and_batch() {
    let pool = ThreadPool::new(3).unwrap();
    for dtype in ALL_DTYPES {
        for n_tokens in [1, 3, 8, 40] {
            check_matmul(&pool, dtype, 37, 256, n_tokens);
        }
    }
}

#[test]
fn matmul_handles_small_widths_and_single_thread() {
    let pool = ThreadPool::new(1).unwrap();
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        for n_tokens in [1, 2, 5, 17] {
            check_matmul(&pool, dtype, 9, 64, n_tokens);
        }
    }
    // f32/f16 rows whose length is not a multiple of the SIMD width.
    for dtype in [GgmlDType::F32, GgmlDType::F16] {
        for n_tokens in [1, 6, 20] {
            check_matmul(&pool, dtype, 7, 100, n_tokens);
        }
    }
}

#[test]
fn matmul_smollm_shapes() {
    let pool = ThreadPool::new(2).unwrap();
    check_matmul(&pool, GgmlDType::Q4_1, 1536, 576, 1);
    check_matmul(&pool, GgmlDType::Q4_1, 576, 1536, 4);
    check_matmul(&pool, GgmlDType::Q8_0, 2048, 576, 1);
}

#[test]
fn matmul_many_equals_separate_matmuls() {
    let pool = ThreadPool::new(2).unwrap();
    let cols = 128;
    let a = Linear::new(
        QMatrix::from_f32(GgmlDType::Q4_1, 64, cols, &pseudo_random(64 * cols, 3)).unwrap(),
        true,
    );
    let b = Linear::new(
        QMatrix::from_f32(GgmlDType::Q8_0, 24, cols, &pseudo_random(24 * cols, 4)).unwrap(),
        false,
    );
    let c = Linear::new(
        QMatrix::from_f32(GgmlDType::Q4K, 8, 256, &pseudo_random(8 * 256, 5)).unwrap(),
        false,
    );
    for n_tokens in [1, 4, 33] {
        let x = pseudo_random(n_tokens * cols, 6);
        let (mut ya, mut yb) = (vec![0f32; n_tokens * 64], vec![0f32; n_tokens * 24]);
        matmul_many(&pool, &[&a, &b], &x, n_tokens, &mut [&mut ya, &mut yb]).unwrap();
        let (mut ea, mut eb) = (vec![0f32; n_tokens * 64], vec![0f32; n_tokens * 24]);
        matmul(&pool, &a, &x, n_tokens, &mut ea).unwrap();
        matmul(&pool, &b, &x, n_tokens, &mut eb).unwrap();
        assert_eq!(ya, ea);
        assert_eq!(yb, eb);
        // Column counts must agree.
        let mut yc = vec![0f32; n_tokens * 8];
        let err = matmul_many(&pool, &[&a, &c], &x, n_tokens, &mut [&mut ya, &mut yc]).unwrap_err();
        assert!(matches!(err, KernelError::InvalidShape { .. }), "{err}");
    }
}

#[test]
fn matmul_rejects_bad_shapes() {
    let pool = ThreadPool::new(2).unwrap();
    let w = Linear::new(
        QMatrix::from_f32(GgmlDType::Q8_0, 4, 32, &pseudo_random(128, 1)).unwrap(),
        false,
    );
    let mut y = vec![0f32; 8];
    assert!(matches!(
        matmul(&pool, &w, &[0.0; 63], 2, &mut y),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        matmul(&pool, &w, &[0.0; 64], 2, &mut y[..7]),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        matmul_many(&pool, &[&w], &[0.0; 64], 2, &mut []),
        Err(KernelError::LengthMismatch { .. })
    ));
    matmul(&pool, &w, &[], 0, &mut []).unwrap();

    // Empty matrices are valid and produce zeros / nothing.
    for dtype in [
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::F32,
        GgmlDType::Q4K,
    ] {
        let no_rows = Linear::new(QMatrix::from_f32(dtype, 0, 256, &[]).unwrap(), false);
        matmul(&pool, &no_rows, &[0.5; 512], 2, &mut []).unwrap();
        let no_cols = Linear::new(QMatrix::from_f32(dtype, 3, 0, &[]).unwrap(), false);
        let mut y = vec![f32::NAN; 6];
        matmul(&pool, &no_cols, &[], 2, &mut y).unwrap();
        assert_eq!(y, [0.0; 6], "{dtype:?}");
    }
}

#[test]
fn qmatrix_from_raw_validates_lengths() {
    let good = QMatrix::from_f32(GgmlDType::Q4_1, 3, 64, &pseudo_random(192, 9)).unwrap();
    assert_eq!(good.ggml_bytes().len(), 3 * 2 * 20);
    let copy = QMatrix::from_raw(GgmlDType::Q4_1, 3, 64, &good.ggml_bytes()).unwrap();
    assert_eq!(copy.dequantize(), good.dequantize());

    let err = QMatrix::from_raw(GgmlDType::Q4_1, 3, 64, &good.ggml_bytes()[1..]).unwrap_err();
    assert_eq!(
        err,
        KernelError::ByteLength {
            dtype: GgmlDType::Q4_1,
            rows: 3,
            cols: 64,
            expected: 120,
            actual: 119
        }
    );
    assert!(QMatrix::from_raw(GgmlDType::Q4_1, 4, 64, &good.ggml_bytes()).is_err());
    assert!(matches!(
        QMatrix::from_raw(GgmlDType::Q4_1, 1, 48, &[0; 40]),
        Err(KernelError::RaggedBlocks { .. })
    ));
    assert!(matches!(
        QMatrix::from_raw(GgmlDType::Q6K, 1, 128, &[0; 105]),
        Err(KernelError::RaggedBlocks { .. })
    ));
    assert!(QMatrix::from_raw(GgmlDType::F32, usize::MAX, 2, &[]).is_err());
    assert!(matches!(
        QMatrix::from_f32(GgmlDType::Q8_0, 2, 32, &[0.0; 63]),
        Err(KernelError::LengthMismatch { .. })
    ));
}

#[test]
fn qmatrix_round_trips_ggml_bytes() {
    for dtype in ALL_DTYPES {
        for rows in [1, 8, 13] {
            let values = pseudo_random(rows * 256, rows as u64);
            let ggml = QMatrix::from_f32(dtype, rows, 256, &values)
                .unwrap()
                .ggml_bytes()
                .into_owned();
            let m = QMatrix::from_raw(dtype, rows, 256, &ggml).unwrap();
            assert_eq!(*m.ggml_bytes(), ggml[..], "{dtype:?} x {rows} rows");
            assert!(m.storage_bytes() >= ggml.len());
        }
    }
}

#[test]
fn qmatrix_dequantizes_close_to_source() {
    let (rows, cols) = (5, 256);
    let values = pseudo_random(rows * cols, 12);
    for dtype in ALL_DTYPES {
        let m = QMatrix::from_f32(dtype, rows, cols, &values).unwrap();
        assert_eq!((m.dtype(), m.rows(), m.cols()), (dtype, rows, cols));
        let all = m.dequantize();
        let err = relative_error(&all, &values);
        let tolerance = match dtype {
            GgmlDType::F32 => 0.0,
            GgmlDType::Q2K => 0.5,
            GgmlDType::Q3K => 0.25,
            _ => 0.12,
        };
        assert!(err <= tolerance, "{dtype:?}: {err}");
        let mut row = vec![0f32; cols];
        m.dequantize_row(4, &mut row).unwrap();
        assert_eq!(row, all[4 * cols..]);
        assert!(matches!(
            m.dequantize_row(5, &mut row),
            Err(KernelError::RowOutOfRange { .. })
        ));
        assert!(matches!(
            m.dequantize_row(0, &mut row[1..]),
            Err(KernelError::LengthMismatch { .. })
        ));
    }
}

#[test]
fn pool_runs_every_task_exactly_once() {
    let pool = ThreadPool::new(4).unwrap();
    assert_eq!(pool.n_threads(), 4);
    for round in 0..2000 {
        let n_tasks = round % 37;
        let counts: Vec<AtomicUsize> = (0..n_tasks).map(|_| AtomicUsize::new(0)).collect();
        pool.run(n_tasks, |i| {
            counts[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(
            counts.iter().all(|c| c.load(Ordering::Relaxed) == 1),
            "round {round}"
        );
    }
}

#[test]
fn pool_serves_callers_on_several_threads() {
    let pool = Arc::new(ThreadPool::new(3).unwrap());
    // One after the other.
    for _ in 0..3 {
        let pool = Arc::clone(&pool);
        std::thread::spawn(move || {
            let sum = AtomicUsize::new(0);
            pool.run(100, |i| {
                sum.fetch_add(i, Ordering::Relaxed);
            });
            assert_eq!(sum.load(Ordering::Relaxed), 4950);
        })
        .join()
        .unwrap();
    }
    // At the same time (calls are serialised).
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || {
                for _ in 0..200 {
                    let sum = AtomicUsize::new(0);
                    pool.run(10, |i| {
                        sum.fetch_add(i + 1, Ordering::Relaxed);
                    });
                    assert_eq!(sum.load(Ordering::Relaxed), 55);
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
}

#[test]
fn pool_survives_panicking_tasks() {
    let pool = ThreadPool::new(3).unwrap();
    for _ in 0..20 {
        let ran = AtomicUsize::new(0);
        let result = catch_unwind(AssertUnwindSafe(|| {
            pool.run(16, |i| {
                ran.fetch_add(1, Ordering::Relaxed);
                if i % 5 == 3 {
                    panic!("task {i} fails");
                }
            })
        }));
        assert!(result.is_err());
        assert_eq!(ran.load(Ordering::Relaxed), 16, "the other tasks still ran");
        let after = AtomicUsize::new(0);
        pool.run(8, |_| {
            after.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(after.load(Ordering::Relaxed), 8);
    }
}

#[test]
fn pool_nested_runs_and_edge_cases() {
    assert!(matches!(ThreadPool::new(0), Err(KernelError::ZeroThreads)));
    let pool = ThreadPool::new(2).unwrap();
    let total = AtomicUsize::new(0);
    pool.run(4, |_| {
        pool.run(3, |_| {
            total.fetch_add(1, Ordering::Relaxed);
        });
    });
    assert_eq!(total.load(Ordering::Relaxed), 12);
    pool.run(0, |_| unreachable!());

    let covered: Vec<AtomicUsize> = (0..103).map(|_| AtomicUsize::new(0)).collect();
    pool.run_chunks(3..103, 10, |range| {
        for i in range {
            covered[i].fetch_add(1, Ordering::Relaxed);
        }
    });
    assert!(covered[..3].iter().all(|c| c.load(Ordering::Relaxed) == 0));
    assert!(covered[3..].iter().all(|c| c.load(Ordering::Relaxed) == 1));
}

#[test]
fn pool_wakes_parked_workers() {
    let pool = ThreadPool::new(2).unwrap();
    // Long enough for the worker to stop spinning and park.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let seen = std::sync::Mutex::new(std::collections::HashSet::new());
    for _ in 0..50 {
        pool.run(64, |_| {
            std::thread::sleep(std::time::Duration::from_micros(50));
            seen.lock().unwrap().insert(std::thread::current().id());
        });
    }
    assert_eq!(seen.lock().unwrap().len(), 2, "both threads took tasks");
}

#[test]
fn rms_norm_and_silu_match_naive() {
    let dim = 37;
    let x = pseudo_random(3 * dim, 21);
    let weight = pseudo_random(dim, 22);
    let mut out = vec![0f32; x.len()];
    ops::rms_norm_rows(&x, &weight, 1e-5, &mut out).unwrap();
    for (row, out_row) in x.chunks(dim).zip(out.chunks(dim)) {
        let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / dim as f32 + 1e-5).sqrt();
        for ((o, v), w) in out_row.iter().zip(row).zip(&weight) {
            assert!((o - v * inv * w).abs() < 1e-5);
        }
    }
    let mut inplace = x.clone();
    ops::rms_norm_rows_inplace(&mut inplace, &weight, 1e-5).unwrap();
    assert_eq!(inplace, out);
    assert!(ops::rms_norm_rows(&x[1..], &weight, 1e-5, &mut out[1..]).is_err());
    assert!(ops::rms_norm_rows(&x, &[], 1e-5, &mut out).is_err());

    let gate: Vec<f32> = pseudo_random(45, 23).iter().map(|v| v * 20.0).collect();
    let up = pseudo_random(45, 24);
    let mut act = vec![0f32; 45];
    ops::silu_mul(&gate, &up, &mut act).unwrap();
    for ((a, g), u) in act.iter().zip(&gate).zip(&up) {
        let expected = g / (1.0 + (-g).exp()) * u;
        assert!(
            (a - expected).abs() <= 1e-5 * (1.0 + expected.abs()),
            "{a} vs {expected}"
        );
    }
    let mut gate_inplace = gate.clone();
    ops::silu_mul_inplace(&mut gate_inplace, &up).unwrap();
    assert_eq!(gate_inplace, act);
    assert!(ops::silu_mul(&gate, &up[1..], &mut act).is_err());
}

#[test]
fn softmax_dot_axpy_argmax() {
    let mut x: Vec<f32> = pseudo_random(19, 31).iter().map(|v| v * 30.0).collect();
    x[4] = f32::NEG_INFINITY;
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let denom: f64 = x.iter().map(|v| f64::from(v - max).exp()).sum();
    let expected: Vec<f32> = x
        .iter()
        .map(|v| (f64::from(v - max).exp() / denom) as f32)
        .collect();
    ops::softmax(&mut x);
    for (a, b) in x.iter().zip(&expected) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    assert_eq!(x[4], 0.0);
    let mut masked = [f32::NEG_INFINITY; 3];
    ops::softmax(&mut masked);
    assert_eq!(masked, [0.0; 3]);
    ops::softmax(&mut []);

    let a = pseudo_random(29, 32);
    let b = pseudo_random(29, 33);
    let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    assert!((ops::dot(&a, &b) - naive).abs() < 1e-5);
    let mut y = b.clone();
    ops::axpy(0.5, &a, &mut y);
    for ((o, x), b) in y.iter().zip(&a).zip(&b) {
        assert!((o - (b + 0.5 * x)).abs() < 1e-6);
    }
    let mut z = b.clone();
    ops::add_assign(&mut z, &a).unwrap();
    assert!(ops::add_assign(&mut z, &a[1..]).is_err());

    assert_eq!(ops::argmax(&[]), None);
    assert_eq!(ops::argmax(&[1.0, 3.0, 3.0, -1.0]), Some(1));
    assert_eq!(ops::argmax(&[f32::NAN, 2.0, 1.0]), Some(1));
    assert_eq!(ops::argmax(&[f32::NEG_INFINITY]), Some(0));
}

#[test]
fn rope_matches_naive_rotation() {
    let (head_dim, n_heads, theta) = (16, 3, 10_000.0f32);
    let table = RopeTable::new(head_dim, theta, 64).unwrap();
    let positions = [0usize, 5, 63];
    let x = pseudo_random(positions.len() * n_heads * head_dim, 41);
    let angle = |pos: usize, i: usize| {
        pos as f64 * f64::from(theta).powf(-((2 * i) as f64) / head_dim as f64)
    };

    let mut neox = x.clone();
    table.apply_neox(&mut neox, &positions, n_heads).unwrap();
    let mut interleaved = x.clone();
    table
        .apply_interleaved(&mut interleaved, &positions, n_heads)
        .unwrap();
    let half = head_dim / 2;
    for (t, &pos) in positions.iter().enumerate() {
        for h in 0..n_heads {
            let base = (t * n_heads + h) * head_dim;
            for i in 0..half {
                let (c, s) = (angle(pos, i).cos() as f32, angle(pos, i).sin() as f32);
                let (a, b) = (x[base + i], x[base + i + half]);
                assert!((neox[base + i] - (a * c - b * s)).abs() < 1e-5);
                assert!((neox[base + i + half] - (a * s + b * c)).abs() < 1e-5);
                let (a, b) = (x[base + 2 * i], x[base + 2 * i + 1]);
                assert!((interleaved[base + 2 * i] - (a * c - b * s)).abs() < 1e-5);
                assert!((interleaved[base + 2 * i + 1] - (a * s + b * c)).abs() < 1e-5);
            }
        }
    }
    assert!(table.apply_neox(&mut neox, &[64, 0, 0], n_heads).is_err());
    assert!(
        table
            .apply_neox(&mut neox[1..], &positions, n_heads)
            .is_err()
    );
    assert!(RopeTable::new(15, theta, 4).is_err());
}

/// The default model's real weights (if fetched): Q4_1 layer matrices and the Q8_0
/// embedding table, through `from_raw` exactly as the loader feeds them.
#[test]
fn real_model_weights_match_reference() {
    use candle_core::Device;
    use candle_core::quantized::gguf_file;

    let Some(path) = common::default_model() else {
        return;
    };
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let pool = ThreadPool::new(2).unwrap();
    for name in [
        "blk.0.attn_q.weight",
        "blk.0.ffn_down.weight",
        "blk.29.ffn_up.weight",
        "token_embd.weight",
    ] {
        let tensor = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        let &[rows, cols] = tensor.shape().dims() else {
            panic!("{name} is not a matrix");
        };
        let w = QMatrix::from_raw(tensor.dtype(), rows, cols, &tensor.data().unwrap()).unwrap();
        let expected_weights: Vec<f32> = tensor
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            w.dequantize(),
            expected_weights,
            "{name}: dequantized weights"
        );

        let rows_checked = rows.min(4096);
        let w = QMatrix::from_raw(
            tensor.dtype(),
            rows_checked,
            cols,
            &w.ggml_bytes()[..rows_checked * w.row_bytes()],
        )
        .unwrap();
        for n_tokens in [1, 5] {
            let x = pseudo_random(n_tokens * cols, 77);
            let expected = reference_matmul(&expected_weights, rows_checked, cols, &x, n_tokens);
            let mut y = vec![0f32; n_tokens * rows_checked];
            matmul(&pool, &Linear::new(w.clone(), false), &x, n_tokens, &mut y).unwrap();
            let err = relative_error(&y, &expected);
            assert!(
                err < 1e-2,
                "{name}, {n_tokens} tokens: relative error {err}"
            );
        }
    }
}
