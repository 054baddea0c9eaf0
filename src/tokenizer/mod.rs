//! Hugging Face `tokenizer.json` tokenizers: text → token ids → text, with
//! the same ids and text as the `tokenizers` library (0.23) for the
//! configurations LLaMA-family checkpoints ship (Llama 2 and 3, Mistral,
//! TinyLlama, Qwen2), checked against fixtures that library produced
//! (`scripts/fixtures/gen_tokenizer.py`, `tests/tokenizer.rs`).
//!
//! Encoding, as `TokenizerImpl::encode`:
//! 1. added tokens with `normalized: false` are cut out of the raw text
//!    (leftmost-longest; see `added`);
//! 2. each stretch in between is normalized, then the `normalized: true`
//!    added tokens are cut out of it;
//! 3. the pre-tokenizer cuts the rest into pieces;
//! 4. the BPE model turns each piece into ids;
//! 5. with `add_special_tokens`, the post-processor's template adds its
//!    tokens (Llama's BOS).
//!
//! Decoding, as `TokenizerImpl::decode`: ids → token strings (ids with no
//! token are skipped; special added tokens too when asked), then the decoder
//! chain, whose result is concatenated (tokens joined by spaces when there is
//! no decoder).
//!
//! Supported components — anything else is refused by name at load time
//! (`Unsupported`), never loaded in part:
//! - model: BPE (`vocab`; `merges` as "a b" strings or ["a", "b"] pairs;
//!   `unk_token`, `fuse_unk`, `byte_fallback`, `ignore_merges`,
//!   `continuing_subword_prefix`, `end_of_word_suffix`; dropout null or 0);
//! - normalizers: Sequence, NFC, Prepend, Replace;
//! - pre-tokenizers: Sequence, ByteLevel, Split (string or regex pattern,
//!   any behavior, invert), Metaspace;
//! - post-processors: TemplateProcessing, ByteLevel (changes no ids),
//!   Sequence of those;
//! - decoders: Sequence, ByteLevel, Replace, ByteFallback, Fuse, Strip,
//!   Metaspace.
//!
//! `truncation` and `padding` in the file are ignored, as transformers'
//! fast tokenizers ignore them unless a call asks for them.
//!
//! A `Tokenizer` is immutable after loading (its piece cache has its own
//! lock): it may be used from several threads at once.

mod added;
mod bpe;
mod decode;
mod fxhash;
mod json;
mod normalize;
mod pattern;
mod pretokenize;

use crate::error::Result;
use added::{AddedToken, AddedVocab, Split};
use bpe::Bpe;
use decode::Decoder;
use json::Obj;
use normalize::Normalizer;
use pretokenize::PreTokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Largest tokenizer.json accepted (real ones are under 20 MB).
const MAX_FILE_BYTES: u64 = 1 << 30;

pub struct Tokenizer {
    model: Bpe,
    added: AddedVocab,
    normalizer: Option<Normalizer>,
    pre_tokenizer: Option<PreTokenizer>,
    decoder: Option<Decoder>,
    /// Ids the post-processor puts before and after a single sequence.
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    vocab_size: usize,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
}

impl Tokenizer {
    /// Loads `path`: a `tokenizer.json` file, or a model directory holding
    /// one. BOS and EOS come from the `tokenizer_config.json` and
    /// `config.json` beside it (see [`Tokenizer::bos_id`]).
    pub fn load(path: &Path) -> Result<Tokenizer> {
        let file: PathBuf = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
        let text = read_file(&file)?;
        let mut t = Tokenizer::from_json_str(&text).map_err(|e| e.context(&file.display().to_string()))?;
        let dir = file.parent().unwrap_or(Path::new("."));
        let (bos, eos) = special_ids(&t, dir)?;
        t.bos_id = bos;
        t.eos_id = eos;
        Ok(t)
    }

    /// Parses the text of a `tokenizer.json` (no BOS/EOS lookup).
    pub fn from_json_str(text: &str) -> Result<Tokenizer> {
        let root: Value = serde_json::from_str(text).map_err(|e| err!(FileFormat, "not valid JSON: {e}"))?;
        let root = Obj::new(&root, "tokenizer.json")?;

        let model_v = root.map.get("model").ok_or_else(|| err!(FileFormat, "no \"model\""))?;
        let m = Obj::new(model_v, "model")?;
        // Files from old `tokenizers` versions may lack the type tag: a model
        // with merges is BPE (as serde's untagged fallback decides).
        let ty = match m.get("type") {
            Some(_) => m.type_name()?,
            None if m.map.contains_key("merges") => "BPE",
            None => bail!(FileFormat, "model: has no \"type\""),
        };
        if ty != "BPE" {
            bail!(Unsupported, "model type {ty:?} is not supported (liblora supports BPE, used by Llama, Mistral and Qwen2)");
        }
        let model = Bpe::from_json(&m)?;

        let normalizer = root.get("normalizer").map(|v| Normalizer::from_json(v, "normalizer")).transpose()?;
        let pre_tokenizer = root.get("pre_tokenizer").map(|v| PreTokenizer::from_json(v, "pre_tokenizer")).transpose()?;
        let decoder = root.get("decoder").map(|v| Decoder::from_json(v, "decoder")).transpose()?;

        let mut list = Vec::new();
        if let Some(v) = root.get("added_tokens") {
            let Value::Array(items) = v else {
                bail!(FileFormat, "added_tokens: expected an array, found {}", json::kind(v));
            };
            for (i, item) in items.iter().enumerate() {
                list.push(AddedToken::from_json(item, &format!("added_tokens[{i}]"))?);
            }
        }
        let added = AddedVocab::new(&list, &model.vocab, |s| match &normalizer {
            Some(n) => n.normalize(s.to_string()),
            None => Ok(s.to_string()),
        })?;

        let (prefix, suffix) = match root.get("post_processor") {
            Some(v) => post_processor(v, "post_processor")?,
            None => (Vec::new(), Vec::new()),
        };

        // `get_vocab_size(true)`: distinct token strings of the model and
        // the added tokens.
        let extra = added.by_content.keys().filter(|k| !model.vocab.contains_key(*k)).count();
        let vocab_size = model.vocab.len() + extra;
        Ok(Tokenizer { model, added, normalizer, pre_tokenizer, decoder, prefix, suffix, vocab_size, bos_id: None, eos_id: None })
    }

    /// Text → ids (`tokenizer.encode(text, add_special_tokens).ids`).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 4);
        if add_special_tokens {
            ids.extend_from_slice(&self.prefix);
        }
        for split in self.added.split_raw(text) {
            let r = match split {
                Split::Token(id) => {
                    ids.push(id);
                    continue;
                }
                Split::Text(r) => r,
            };
            let at_start = r.start == 0;
            let chunk = text[r].to_string();
            let normalized = match &self.normalizer {
                Some(n) => n.normalize(chunk)?,
                None => chunk,
            };
            for split in self.added.split_normalized(&normalized) {
                match split {
                    Split::Token(id) => ids.push(id),
                    Split::Text(r) => {
                        let piece = &normalized[r.clone()];
                        let at_start = at_start && r.start == 0;
                        match &self.pre_tokenizer {
                            Some(p) => p.for_each(piece, at_start, &mut |p, _| self.model.tokenize(p, &mut ids))?,
                            None => self.model.tokenize(piece, &mut ids)?,
                        }
                    }
                }
            }
        }
        if add_special_tokens {
            ids.extend_from_slice(&self.suffix);
        }
        Ok(ids)
    }

    /// Ids → text (`tokenizer.decode(ids, skip_special_tokens)`). Ids with
    /// no token are skipped, as `tokenizers` does.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let mut tokens = Vec::with_capacity(ids.len());
        for &id in ids {
            let Some(t) = self.id_to_token(id) else { continue };
            if skip_special_tokens && self.added.is_special(t) {
                continue;
            }
            tokens.push(t.to_string());
        }
        match &self.decoder {
            Some(d) => Ok(d.decode_chain(tokens)?.concat()),
            None => Ok(tokens.join(" ")),
        }
    }

    /// The token string of an id: an added token's content (normalized
    /// when the token is marked `normalized`, as `tokenizers` 0.23 gives
    /// it), else the model's (`tokenizer.id_to_token`).
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.added.content_of(id).or_else(|| self.model.vocab_r.get(&id).map(String::as_str))
    }

    /// The id of a token string (`tokenizer.token_to_id`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.added.by_content.get(token).or_else(|| self.model.vocab.get(token)).copied()
    }

    /// `len(tokenizer)` / `get_vocab_size(with_added_tokens=True)`: the
    /// number of distinct tokens, model and added.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The BOS id: `bos_token` of `tokenizer_config.json` (a string or an
    /// `{"content": ..}` object, as transformers' `tokenizer.bos_token_id`);
    /// where that file, the key or its value is absent (or null), or the
    /// token is not in the vocabulary, `bos_token_id` of `config.json` (the
    /// first one of a list). None when neither has one. Both files are read
    /// from the directory of tokenizer.json.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The EOS id, looked up as [`Tokenizer::bos_id`] with `eos_token` and
    /// `eos_token_id`.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Whether `decode(.., skip_special_tokens = true)` leaves `id` out:
    /// its token string (as [`Tokenizer::id_to_token`]) is the content of a
    /// special added token — the test `tokenizers` makes.
    pub fn is_special(&self, id: u32) -> bool {
        self.added.content_of(id).is_some_and(|c| self.added.is_special(c))
    }
}

fn read_file(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| err!(Io, "{}: cannot open: {e}", path.display()))?;
    if !meta.is_file() {
        bail!(Io, "{}: not a regular file", path.display());
    }
    if meta.len() > MAX_FILE_BYTES {
        bail!(FileFormat, "{}: {} bytes; tokenizer files over {MAX_FILE_BYTES} bytes are refused", path.display(), meta.len());
    }
    let bytes = std::fs::read(path).map_err(|e| err!(Io, "{}: cannot read: {e}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| err!(FileFormat, "{}: not UTF-8 (byte {})", path.display(), e.utf8_error().valid_up_to()))
}

/// The ids a post-processor adds around a single sequence with
/// `add_special_tokens`.
fn post_processor(v: &Value, at: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let o = Obj::new(v, at)?;
    match o.type_name()? {
        // ByteLevel post-processing only trims offsets.
        "ByteLevel" => Ok((Vec::new(), Vec::new())),
        "Sequence" => {
            let mut prefix = Vec::new();
            let mut suffix = Vec::new();
            for (i, p) in o.array("processors")?.iter().enumerate() {
                // Each processor wraps the output of the previous one.
                let (p, s) = post_processor(p, &format!("{at}.processors[{i}]"))?;
                prefix.splice(0..0, p);
                suffix.extend(s);
            }
            Ok((prefix, suffix))
        }
        "TemplateProcessing" => template(&o),
        other => bail!(
            Unsupported,
            "{at}: post-processor type {other:?} is not supported (liblora supports TemplateProcessing, ByteLevel, Sequence)"
        ),
    }
}

/// The `single` template of a TemplateProcessing: special-token items before
/// and after the one `$A` sequence.
fn template(o: &Obj) -> Result<(Vec<u32>, Vec<u32>)> {
    let specials = o.get("special_tokens").map(|v| Obj::new(v, "post_processor.special_tokens")).transpose()?;
    let single = o.get("single").ok_or_else(|| err!(FileFormat, "{}: missing", o.path("single")))?;
    // Items: {"SpecialToken": {"id": name}} / {"Sequence": {"id": "A"}}, or
    // the string form "<s> $A" / "$A:0" / "<s>:1".
    enum Item {
        Special(String),
        Sequence(String),
    }
    let mut items = Vec::new();
    match single {
        Value::String(s) => {
            for w in s.split_whitespace() {
                let name = w.rsplit_once(':').filter(|(_, t)| t.parse::<u32>().is_ok()).map_or(w, |(n, _)| n);
                match name.strip_prefix('$') {
                    Some(seq) => items.push(Item::Sequence(if seq.is_empty() { "A".into() } else { seq.to_string() })),
                    None => items.push(Item::Special(name.to_string())),
                }
            }
        }
        Value::Array(list) => {
            for (i, it) in list.iter().enumerate() {
                let at = format!("{}[{i}]", o.path("single"));
                let io = Obj::new(it, &at)?;
                if let Some(st) = io.get("SpecialToken") {
                    items.push(Item::Special(Obj::new(st, &at)?.str("id")?.to_string()));
                } else if let Some(sq) = io.get("Sequence") {
                    items.push(Item::Sequence(Obj::new(sq, &at)?.str("id")?.to_string()));
                } else {
                    bail!(FileFormat, "{at}: expected SpecialToken or Sequence, found {}", json::short(it));
                }
            }
        }
        other => bail!(FileFormat, "{}: expected a template, found {}", o.path("single"), json::kind(other)),
    }
    let (mut prefix, mut suffix) = (Vec::new(), Vec::new());
    let mut seen_seq = false;
    for item in items {
        match item {
            Item::Sequence(s) if s == "A" && !seen_seq => seen_seq = true,
            Item::Sequence(s) => bail!(FileFormat, "{}: the single-sequence template uses ${s} (only one $A is allowed)", o.path("single")),
            Item::Special(name) => {
                let sp = specials
                    .as_ref()
                    .and_then(|s| s.get(&name))
                    .ok_or_else(|| err!(FileFormat, "{}: special token {name:?} is not in special_tokens", o.path("single")))?;
                let at = format!("post_processor.special_tokens[{name:?}]");
                let sp = Obj::new(sp, &at)?;
                let dest = if seen_seq { &mut suffix } else { &mut prefix };
                for (i, id) in sp.array("ids")?.iter().enumerate() {
                    dest.push(json::as_id(id, &format!("{at}.ids[{i}]"))?);
                }
            }
        }
    }
    if !seen_seq {
        bail!(FileFormat, "{}: the template has no $A", o.path("single"));
    }
    Ok((prefix, suffix))
}

/// BOS and EOS ids from `tokenizer_config.json` and `config.json` in `dir`
/// (see [`Tokenizer::bos_id`]).
fn special_ids(t: &Tokenizer, dir: &Path) -> Result<(Option<u32>, Option<u32>)> {
    let tc = read_json_opt(&dir.join("tokenizer_config.json"))?;
    let cfg = read_json_opt(&dir.join("config.json"))?;
    let from_tc = |key: &str| -> Option<u32> {
        let v = tc.as_ref()?.get(key)?;
        let name = match v {
            Value::String(s) => s.as_str(),
            Value::Object(o) => o.get("content")?.as_str()?,
            _ => return None,
        };
        t.token_to_id(name)
    };
    let from_cfg = |key: &str| -> Option<u32> {
        let v = cfg.as_ref()?.get(key)?;
        let v = match v {
            Value::Array(a) => a.first()?,
            v => v,
        };
        v.as_u64().filter(|&n| n <= i32::MAX as u64).map(|n| n as u32)
    };
    Ok((from_tc("bos_token").or_else(|| from_cfg("bos_token_id")), from_tc("eos_token").or_else(|| from_cfg("eos_token_id"))))
}

/// A JSON file that may be absent; present but unreadable or malformed is
/// an error (a half-read configuration would give wrong ids silently).
fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = read_file(path)?;
    let v: Value = serde_json::from_str(&text).map_err(|e| err!(FileFormat, "{}: not valid JSON: {e}", path.display()))?;
    if !v.is_object() {
        bail!(FileFormat, "{}: expected a JSON object", path.display());
    }
    Ok(Some(v))
}
