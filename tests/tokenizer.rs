//! The tokenizer against the `tokenizers` library: every fixture directory
//! in tests/fixtures/tokenizer (made by scripts/fixtures/gen_tokenizer.py)
//! holds a tokenizer.json and the ids and texts `tokenizers` 0.23 gave for
//! tricky and random strings; the ids must be equal and the decoded text
//! identical, byte for byte. Then the refusals: unsupported components are
//! named, malformed files are FileFormat, and nothing is loaded in part.
//!
//! `LORA_TOKENIZER_EXTRA=dir1:dir2` adds directories with the same layout
//! (e.g. a real Qwen2.5 or TinyLlama tokenizer with cases made by the same
//! script) to the fixture test.

use lora::tokenizer::Tokenizer;
use lora::ErrorKind;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn fixture_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixture_root())
        .expect("tests/fixtures/tokenizer")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("cases.json").is_file())
        .collect();
    dirs.sort();
    if let Ok(extra) = std::env::var("LORA_TOKENIZER_EXTRA") {
        dirs.extend(extra.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    }
    dirs
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Runs every case of one fixture; returns the mismatches (at most a few
/// printed per kind) and the number of checks made.
fn check_fixture(dir: &Path) -> (Vec<String>, usize) {
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let tok = Tokenizer::load(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    let mut bad = Vec::new();
    let mut n = 0;
    for c in cases["encode"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        for (key, special) in [("ids", true), ("ids_plain", false)] {
            n += 1;
            let want = ids_of(&c[key]);
            match tok.encode(text, special) {
                Ok(got) if got == want => {}
                Ok(got) => bad.push(format!("{name}: encode({text:?}, add_special={special})\n  got  {got:?}\n  want {want:?}")),
                Err(e) => bad.push(format!("{name}: encode({text:?}) failed: {e}")),
            }
        }
    }
    for c in cases["decode"].as_array().unwrap() {
        n += 1;
        let ids = ids_of(&c["ids"]);
        let skip = c["skip_special"].as_bool().unwrap();
        let want = c["text"].as_str().unwrap();
        match tok.decode(&ids, skip) {
            Ok(got) if got == want => {}
            Ok(got) => bad.push(format!("{name}: decode({ids:?}, skip={skip})\n  got  {got:?}\n  want {want:?}")),
            Err(e) => bad.push(format!("{name}: decode({ids:?}) failed: {e}")),
        }
    }
    for pair in cases["id_to_token"].as_array().unwrap() {
        n += 1;
        let id = pair[0].as_u64().unwrap() as u32;
        let want = pair[1].as_str();
        let got = tok.id_to_token(id);
        if got != want {
            bad.push(format!("{name}: id_to_token({id}) = {got:?}, want {want:?}"));
        }
    }
    for pair in cases["token_to_id"].as_array().unwrap() {
        n += 1;
        let t = pair[0].as_str().unwrap();
        let want = pair[1].as_u64().map(|v| v as u32);
        if tok.token_to_id(t) != want {
            bad.push(format!("{name}: token_to_id({t:?}) = {:?}, want {want:?}", tok.token_to_id(t)));
        }
    }
    n += 3;
    let vs = cases["vocab_size"].as_u64().unwrap() as usize;
    if tok.vocab_size() != vs {
        bad.push(format!("{name}: vocab_size {} want {vs}", tok.vocab_size()));
    }
    let want_id = |k: &str| cases.get(k).and_then(Value::as_i64).filter(|&v| v >= 0).map(|v| v as u32);
    if tok.bos_id() != want_id("bos_id") {
        bad.push(format!("{name}: bos_id {:?} want {:?}", tok.bos_id(), want_id("bos_id")));
    }
    if tok.eos_id() != want_id("eos_id") {
        bad.push(format!("{name}: eos_id {:?} want {:?}", tok.eos_id(), want_id("eos_id")));
    }
    (bad, n)
}

#[test]
fn matches_tokenizers_on_every_fixture() {
    let dirs = fixture_dirs();
    let names: Vec<String> = dirs.iter().map(|d| d.file_name().unwrap().to_string_lossy().to_string()).collect();
    for want in ["bytes", "gemma", "gpt2", "llama2", "llama3", "misc", "mistral", "qwen2", "sp_unk"] {
        assert!(names.iter().any(|n| n == want), "fixture {want} missing from {}", fixture_root().display());
    }
    let mut all_bad = Vec::new();
    let mut total = 0;
    for d in &dirs {
        let (bad, n) = check_fixture(d);
        println!("{}: {} checks, {} mismatches", d.display(), n, bad.len());
        total += n;
        all_bad.extend(bad);
    }
    println!("{total} checks in all");
    if !all_bad.is_empty() {
        let shown: Vec<&String> = all_bad.iter().take(25).collect();
        panic!("{} mismatches with `tokenizers`; first ones:\n{}", all_bad.len(), shown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n"));
    }
}

/// The byte-level fixture maps bytes to ids 1:1: any text, its UTF-8 bytes.
#[test]
fn byte_tokenizer_ids_are_bytes() {
    let tok = Tokenizer::load(&fixture_root().join("bytes")).unwrap();
    assert_eq!(tok.vocab_size(), 256);
    let text = "héllo, 世界 🤗\n\t\0\u{7f}";
    let ids = tok.encode(text, true).unwrap();
    assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>());
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    // A cut multi-byte character decodes to U+FFFD, as from_utf8_lossy.
    assert_eq!(tok.decode(&[0xF0, 0x9F, 0xA4], false).unwrap(), "\u{FFFD}");
    assert_eq!(tok.decode(&[0x41, 0xFF, 0x42], false).unwrap(), "A\u{FFFD}B");
    assert_eq!(tok.bos_id(), None);
    assert_eq!(tok.eos_id(), None);
}

/// Encoding is deterministic across the piece cache: a text encoded twice,
/// and its words encoded after the cache filled, give the same ids.
#[test]
fn cache_does_not_change_results() {
    let tok = Tokenizer::load(&fixture_root().join("qwen2")).unwrap();
    let text: String = (0..3000).map(|i| format!("w{i}x{} ", i * 7919 % 10007)).collect();
    let a = tok.encode(&text, false).unwrap();
    let b = tok.encode(&text, false).unwrap();
    assert_eq!(a, b);
    let fresh = Tokenizer::load(&fixture_root().join("qwen2")).unwrap();
    assert_eq!(fresh.encode("w12x3 w2999x", false).unwrap(), tok.encode("w12x3 w2999x", false).unwrap());
}

/// The tokenizer.json of a fixture as JSON, to be edited by a test.
fn fixture_json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_root().join(name).join("tokenizer.json")).unwrap()).unwrap()
}

fn load_err(j: &Value) -> lora::Error {
    match Tokenizer::from_json_str(&j.to_string()) {
        Ok(_) => panic!("loaded a tokenizer that should be refused"),
        Err(e) => e,
    }
}

#[test]
fn unsupported_components_are_refused_by_name() {
    let cases: Vec<(&str, Value, &str)> = vec![
        ("model", serde_json::json!({"type": "Unigram", "vocab": [["a", 0.0]], "unk_id": 0}), "\"Unigram\""),
        ("model", serde_json::json!({"type": "WordPiece", "vocab": {"a": 0}, "unk_token": "a"}), "\"WordPiece\""),
        ("normalizer", serde_json::json!({"type": "NFKC"}), "\"NFKC\""),
        ("normalizer", serde_json::json!({"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}), "\"Lowercase\""),
        ("normalizer", serde_json::json!({"type": "BertNormalizer"}), "\"BertNormalizer\""),
        ("pre_tokenizer", serde_json::json!({"type": "Whitespace"}), "\"Whitespace\""),
        ("pre_tokenizer", serde_json::json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}]}), "\"Digits\""),
        ("decoder", serde_json::json!({"type": "WordPiece", "prefix": "##"}), "\"WordPiece\""),
        ("decoder", serde_json::json!({"type": "CTC"}), "\"CTC\""),
        ("post_processor", serde_json::json!({"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0]}), "\"RobertaProcessing\""),
        ("post_processor", serde_json::json!({"type": "BertProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0]}), "\"BertProcessing\""),
    ];
    for (field, value, needle) in cases {
        let mut j = fixture_json("llama2");
        j[field] = value;
        let e = load_err(&j);
        assert_eq!(e.kind, ErrorKind::Unsupported, "{field}: {e}");
        assert!(e.message.contains(needle), "{field}: message {:?} does not name {needle}", e.message);
    }
    // BPE dropout makes encoding random: refused; 0.0 is fine.
    let mut j = fixture_json("llama2");
    j["model"]["dropout"] = serde_json::json!(0.1);
    let e = load_err(&j);
    assert_eq!(e.kind, ErrorKind::Unsupported);
    assert!(e.message.contains("dropout"), "{e}");
    j["model"]["dropout"] = serde_json::json!(0.0);
    Tokenizer::from_json_str(&j.to_string()).unwrap();
    // A regex fancy-regex cannot compile is Unsupported, naming the pattern.
    let mut j = fixture_json("qwen2");
    j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = serde_json::json!("(?<name");
    let e = load_err(&j);
    assert_eq!(e.kind, ErrorKind::Unsupported, "{e}");
    assert!(e.message.contains("(?<name"), "{e}");
}

#[test]
fn malformed_files_are_file_format_errors() {
    let edits: Vec<(&str, Box<dyn Fn(&mut Value)>)> = vec![
        ("no model", Box::new(|j| j.as_object_mut().unwrap().remove("model").map(|_| ()).unwrap())),
        ("vocab not an object", Box::new(|j| j["model"]["vocab"] = serde_json::json!([1, 2]))),
        ("negative id", Box::new(|j| j["model"]["vocab"]["a"] = serde_json::json!(-1))),
        ("merge of unknown token", Box::new(|j| j["model"]["merges"].as_array_mut().unwrap().push(serde_json::json!(["zzz", "yyy"])))),
        ("merge with three parts", Box::new(|j| j["model"]["merges"].as_array_mut().unwrap().push(serde_json::json!("a b c")))),
        ("merge not a pair", Box::new(|j| j["model"]["merges"].as_array_mut().unwrap().push(serde_json::json!(["a"])))),
        ("added token without content", Box::new(|j| j["added_tokens"][0].as_object_mut().unwrap().remove("content").map(|_| ()).unwrap())),
        ("added_tokens not an array", Box::new(|j| j["added_tokens"] = serde_json::json!({}))),
        ("template with unknown special", Box::new(|j| j["post_processor"]["single"][0]["SpecialToken"]["id"] = serde_json::json!("<nope>"))),
        ("template without $A", Box::new(|j| j["post_processor"]["single"] = serde_json::json!([{"SpecialToken": {"id": "<s>", "type_id": 0}}]))),
        ("Strip content of two chars", Box::new(|j| j["decoder"]["decoders"][3]["content"] = serde_json::json!("ab"))),
        ("normalizer without type", Box::new(|j| j["normalizer"] = serde_json::json!({"prepend": "x"}))),
        ("Replace without pattern", Box::new(|j| j["normalizer"]["normalizers"][1].as_object_mut().unwrap().remove("pattern").map(|_| ()).unwrap())),
    ];
    for (what, edit) in edits {
        let mut j = fixture_json("llama2");
        edit(&mut j);
        let e = load_err(&j);
        assert_eq!(e.kind, ErrorKind::FileFormat, "{what}: {e}");
    }
    for text in ["", "{", "[]", "null", "{\"model\": 3}"] {
        let e = Tokenizer::from_json_str(text).err().unwrap_or_else(|| panic!("{text:?} loaded"));
        assert_eq!(e.kind, ErrorKind::FileFormat, "{text:?}: {e}");
    }
}

#[test]
fn load_paths() {
    // A directory or the file itself.
    let dir = fixture_root().join("llama2");
    let a = Tokenizer::load(&dir).unwrap();
    let b = Tokenizer::load(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(a.encode("Hello world", true).unwrap(), b.encode("Hello world", true).unwrap());
    assert_eq!((a.bos_id(), a.eos_id()), (Some(1), Some(2)));
    assert_eq!((b.bos_id(), b.eos_id()), (Some(1), Some(2)));
    let e = Tokenizer::load(Path::new("/nonexistent/tokenizer.json")).err().unwrap();
    assert_eq!(e.kind, ErrorKind::Io);
    assert!(e.message.contains("/nonexistent/tokenizer.json"), "{e}");
    // A directory without tokenizer.json.
    let e = Tokenizer::load(&fixture_root()).err().unwrap();
    assert_eq!(e.kind, ErrorKind::Io, "{e}");
    // A malformed config beside a good tokenizer.json is an error, not ignored.
    let tmp = std::env::temp_dir().join(format!("lora-tok-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(dir.join("tokenizer.json"), tmp.join("tokenizer.json")).unwrap();
    std::fs::write(tmp.join("config.json"), "{not json").unwrap();
    let e = Tokenizer::load(&tmp).err().unwrap();
    assert_eq!(e.kind, ErrorKind::FileFormat, "{e}");
    assert!(e.message.contains("config.json"), "{e}");
    // config.json ids, a list for eos (Llama 3.1 style), when there is no
    // tokenizer_config.json.
    std::fs::write(tmp.join("config.json"), r#"{"bos_token_id": 1, "eos_token_id": [2, 0]}"#).unwrap();
    let t = Tokenizer::load(&tmp).unwrap();
    assert_eq!((t.bos_id(), t.eos_id()), (Some(1), Some(2)));
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn added_token_ids_follow_tokenizers_not_the_file() {
    // `tokenizers` assigns ids to added tokens outside the model vocabulary
    // in order after it, whatever the file says (it only warns).
    let mut j = fixture_json("qwen2");
    j["added_tokens"][1]["id"] = serde_json::json!(700);
    let t = Tokenizer::from_json_str(&j.to_string()).unwrap();
    assert_eq!(t.token_to_id("<|im_start|>"), Some(657));
    assert_eq!(t.id_to_token(700), None);
}
