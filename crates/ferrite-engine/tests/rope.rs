//! Every RoPE scaling ferrite reads, against transformers' rotary embeddings
//! (tests/fixtures/rope/reference.json, made by scripts/gen_rope_reference.py): the config is
//! parsed as a checkpoint's would be, the rotation built for the case's context length, and its
//! cos and sin rows (attention factor included) equal transformers' at the recorded positions.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ferrite_engine::model::arch::rope::Rotary;
use ferrite_engine::model::hf_config::ModelConfig;
use serde_json::Value;

fn rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect()
}

#[test]
fn every_scaling_matches_transformers() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/rope/reference.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    let mut kinds = std::collections::BTreeSet::new();
    let mut worst = 0f32;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let cfg = ModelConfig::from_json_text(&case["config"].to_string(), Path::new(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        kinds.insert(format!("{:?}", cfg.rope.scaling).split([' ', '(', '{']).next().unwrap().to_string());
        let context_len = case["context_len"].as_u64().unwrap() as usize;
        let rotary = Rotary::new(&cfg.rope, cfg.block.rotary_dim, context_len);
        let positions: Vec<u32> =
            case["positions"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap() as u32).collect();
        let ids = Tensor::new(positions.as_slice(), &Device::Cpu).unwrap();
        let (cos, sin) = rotary.cos_sin(&positions, &ids, DType::F32, &Device::Cpu).unwrap();
        for (what, got, want) in [
            ("cos", cos.to_vec2::<f32>().unwrap(), rows(&case["cos"])),
            ("sin", sin.to_vec2::<f32>().unwrap(), rows(&case["sin"])),
        ] {
            assert_eq!(got[0].len(), want[0].len(), "{name}: rotary dims");
            for ((p, g), w) in positions.iter().zip(&got).zip(&want) {
                let err = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                // Both sides compute the frequencies and angles in f32 the same way; the
                // cos/sin of angles up to ~900 radians may still round 1 ulp apart (1.2e-7 seen).
                assert!(err < 1e-6, "{name}: {what} at position {p} differs by {err}");
                worst = worst.max(err);
            }
        }
    }
    println!("largest difference over every case: {worst:e}");
    for kind in ["Default", "Linear", "Llama3", "Yarn", "LongRope", "DynamicNtk"] {
        assert!(kinds.contains(kind), "no case parses to {kind}: {kinds:?}");
    }
    // The two LongRoPE contexts pick different factor sets, and the dynamic base grows only
    // past max_position_embeddings: the cases would not tell them apart otherwise.
    let by_name = |n: &str| cases.iter().find(|c| c["name"] == n).unwrap();
    // (Index 2 is position 7 in every case.)
    assert_ne!(rows(&by_name("longrope_short")["cos"])[2], rows(&by_name("longrope_long")["cos"])[2]);
    assert_eq!(rows(&by_name("dynamic_within")["cos"])[2], rows(&by_name("default")["cos"])[2]);
}
