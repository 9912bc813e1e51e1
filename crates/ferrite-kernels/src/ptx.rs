//! The PTX build.rs produced from `kernels/*.cu`, one module per file, and the names of the
//! kernels each exports (`<kernel>_<dtype suffix>`, e.g. `paged_attention_decode_bf16`).

/// One PTX module: its name in candle's per-device module cache, and its text.
#[derive(Debug, Clone, Copy)]
pub struct Module {
    /// Prefixed with `ferrite_` so it cannot collide with another crate's custom module.
    pub name: &'static str,
    pub ptx: &'static str,
}

/// `kernels/reshape_and_cache.cu`: [`RESHAPE_AND_CACHE`].
pub const RESHAPE_AND_CACHE_MODULE: Module = Module {
    name: "ferrite_reshape_and_cache",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/reshape_and_cache.ptx")),
};

/// `kernels/paged_attention_decode.cu`: [`PAGED_ATTENTION_DECODE`] and
/// [`PAGED_ATTENTION_DECODE_REDUCE`].
pub const PAGED_ATTENTION_DECODE_MODULE: Module = Module {
    name: "ferrite_paged_attention_decode",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/paged_attention_decode.ptx")),
};

/// `kernels/paged_attention_prefill.cu`: [`PAGED_ATTENTION_PREFILL`].
pub const PAGED_ATTENTION_PREFILL_MODULE: Module = Module {
    name: "ferrite_paged_attention_prefill",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/paged_attention_prefill.ptx")),
};

/// `kernels/paged_attention_prefill_tc.cu`: [`PAGED_ATTENTION_PREFILL_TC`] (f16 and bf16 only).
pub const PAGED_ATTENTION_PREFILL_TC_MODULE: Module = Module {
    name: "ferrite_paged_attention_prefill_tc",
    ptx: include_str!(concat!(env!("OUT_DIR"), "/paged_attention_prefill_tc.ptx")),
};

/// `kernels/sample.cu`: [`SAMPLE_ROWS`] (f32 logits only).
pub const SAMPLE_MODULE: Module =
    Module { name: "ferrite_sample", ptx: include_str!(concat!(env!("OUT_DIR"), "/sample.ptx")) };

/// `kernels/fused.cu`: [`QKV_ROPE`], [`SILU_MUL`] and [`ADD_RMS_NORM`].
pub const FUSED_MODULE: Module =
    Module { name: "ferrite_fused", ptx: include_str!(concat!(env!("OUT_DIR"), "/fused.ptx")) };

/// `kernels/gemv.cu`: [`GEMV`].
pub const GEMV_MODULE: Module =
    Module { name: "ferrite_gemv", ptx: include_str!(concat!(env!("OUT_DIR"), "/gemv.ptx")) };

/// Kernel name prefixes; the exported symbol appends `_f32`, `_f16` or `_bf16`.
pub const RESHAPE_AND_CACHE: &str = "reshape_and_cache";
pub const PAGED_ATTENTION_DECODE: &str = "paged_attention_decode";
pub const PAGED_ATTENTION_DECODE_REDUCE: &str = "paged_attention_decode_reduce";
pub const PAGED_ATTENTION_PREFILL: &str = "paged_attention_prefill";
pub const PAGED_ATTENTION_PREFILL_TC: &str = "paged_attention_prefill_tc";
pub const SAMPLE_ROWS: &str = "sample_rows";
pub const QKV_ROPE: &str = "qkv_rope";
pub const SILU_MUL: &str = "silu_mul";
pub const ADD_RMS_NORM: &str = "add_rms_norm";
pub const GEMV: &str = "gemv";

/// Dtype suffixes of the exported kernels.
pub const DTYPE_SUFFIXES: [&str; 3] = ["f32", "f16", "bf16"];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel the launch code names is an entry point of its module's PTX.
    #[test]
    fn every_named_kernel_is_in_its_ptx() {
        let kernels = [
            (RESHAPE_AND_CACHE_MODULE, RESHAPE_AND_CACHE),
            (PAGED_ATTENTION_DECODE_MODULE, PAGED_ATTENTION_DECODE),
            (PAGED_ATTENTION_DECODE_MODULE, PAGED_ATTENTION_DECODE_REDUCE),
            (PAGED_ATTENTION_PREFILL_MODULE, PAGED_ATTENTION_PREFILL),
            (FUSED_MODULE, QKV_ROPE),
            (FUSED_MODULE, SILU_MUL),
            (FUSED_MODULE, ADD_RMS_NORM),
            (GEMV_MODULE, GEMV),
        ];
        for (module, kernel) in kernels {
            for suffix in DTYPE_SUFFIXES {
                let entry = format!(".entry {kernel}_{suffix}(");
                assert!(module.ptx.contains(&entry), "{} lacks {entry}", module.name);
            }
        }
        for suffix in ["f16", "bf16"] {
            let entry = format!(".entry {PAGED_ATTENTION_PREFILL_TC}_{suffix}(");
            let module = PAGED_ATTENTION_PREFILL_TC_MODULE;
            assert!(module.ptx.contains(&entry), "{} lacks {entry}", module.name);
        }
        let entry = format!(".entry {SAMPLE_ROWS}_f32(");
        assert!(SAMPLE_MODULE.ptx.contains(&entry), "{} lacks {entry}", SAMPLE_MODULE.name);
    }
}
