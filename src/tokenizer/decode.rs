//! Decoders: token strings → text, as `tokenizers`' `decode_chain`s. Each
//! stage maps a list of strings to a list of strings; the result is their
//! concatenation.

use super::json::Obj;
use super::pattern::{self, Pattern};
use super::pretokenize::PrependScheme;
use crate::error::Result;
use serde_json::Value;

pub(crate) enum Decoder {
    Sequence(Vec<Decoder>),
    /// GPT-2 characters → bytes; all tokens joined, then invalid UTF-8
    /// replaced by U+FFFD per maximal invalid subsequence
    /// (`String::from_utf8_lossy`). A token with a character outside the
    /// byte map contributes its own UTF-8 bytes.
    ByteLevel,
    Replace(Pattern, String),
    /// Runs of `<0xXX>` tokens → their bytes as text when valid UTF-8, else
    /// one U+FFFD per byte.
    ByteFallback,
    /// All tokens into one.
    Fuse,
    /// Removes up to `start` leading and `stop` trailing `content`
    /// characters from each token.
    Strip { content: char, start: usize, stop: usize },
    /// `replacement` → space; in the first token, with a prepend scheme
    /// other than "never", the replacement characters are removed instead.
    Metaspace { replacement: char, prepend: PrependScheme },
}

const SUPPORTED: &str = "Sequence, ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace";

impl Decoder {
    pub fn from_json(v: &Value, at: &str) -> Result<Decoder> {
        let o = Obj::new(v, at)?;
        Ok(match o.type_name()? {
            "Sequence" => {
                let items = o.array("decoders")?;
                let mut out = Vec::with_capacity(items.len());
                for (i, d) in items.iter().enumerate() {
                    out.push(Decoder::from_json(d, &format!("{at}.decoders[{i}]"))?);
                }
                Decoder::Sequence(out)
            }
            "ByteLevel" => Decoder::ByteLevel,
            "Replace" => {
                let p = o.map.get("pattern").ok_or_else(|| err!(FileFormat, "{}: missing", o.path("pattern")))?;
                Decoder::Replace(Pattern::from_json(p, &o.path("pattern"))?, o.str("content")?.to_string())
            }
            "ByteFallback" => Decoder::ByteFallback,
            "Fuse" => Decoder::Fuse,
            "Strip" => Decoder::Strip { content: o.char("content")?, start: o.usize_or("start", 0)?, stop: o.usize_or("stop", 0)? },
            "Metaspace" => Decoder::Metaspace { replacement: o.char("replacement")?, prepend: PrependScheme::from_json(&o)? },
            other => bail!(Unsupported, "{at}: decoder type {other:?} is not supported (liblora supports {SUPPORTED})"),
        })
    }

    pub fn decode_chain(&self, tokens: Vec<String>) -> Result<Vec<String>> {
        Ok(match self {
            Decoder::Sequence(items) => {
                let mut t = tokens;
                for d in items {
                    t = d.decode_chain(t)?;
                }
                t
            }
            Decoder::ByteLevel => {
                let mut bytes = Vec::new();
                for t in &tokens {
                    let start = bytes.len();
                    let all = t.chars().all(|c| match pattern::char_to_byte(c) {
                        Some(b) => {
                            bytes.push(b);
                            true
                        }
                        None => false,
                    });
                    if !all {
                        bytes.truncate(start);
                        bytes.extend_from_slice(t.as_bytes());
                    }
                }
                vec![String::from_utf8_lossy(&bytes).into_owned()]
            }
            Decoder::Replace(p, content) => tokens.iter().map(|t| p.replace_all(t, content)).collect::<Result<_>>()?,
            Decoder::ByteFallback => {
                let mut out = Vec::with_capacity(tokens.len());
                let mut pending: Vec<u8> = Vec::new();
                for t in tokens {
                    match byte_token(&t) {
                        Some(b) => pending.push(b),
                        None => {
                            flush_bytes(&mut pending, &mut out);
                            out.push(t);
                        }
                    }
                }
                flush_bytes(&mut pending, &mut out);
                out
            }
            Decoder::Fuse => vec![tokens.concat()],
            Decoder::Strip { content, start, stop } => tokens.into_iter().map(|t| strip(&t, *content, *start, *stop)).collect(),
            Decoder::Metaspace { replacement, prepend } => tokens
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    t.chars()
                        .filter_map(|c| {
                            if c != *replacement {
                                Some(c)
                            } else if i == 0 && *prepend != PrependScheme::Never {
                                None
                            } else {
                                Some(' ')
                            }
                        })
                        .collect()
                })
                .collect(),
        })
    }
}

/// `<0xXX>` (exactly six bytes, two hex digits) → the byte.
fn byte_token(t: &str) -> Option<u8> {
    if t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') {
        u8::from_str_radix(&t[3..5], 16).ok()
    } else {
        None
    }
}

fn flush_bytes(pending: &mut Vec<u8>, out: &mut Vec<String>) {
    if pending.is_empty() {
        return;
    }
    match String::from_utf8(std::mem::take(pending)) {
        Ok(s) => out.push(s),
        Err(e) => out.extend(std::iter::repeat_n("\u{FFFD}".to_string(), e.as_bytes().len())),
    }
}

fn strip(t: &str, content: char, start: usize, stop: usize) -> String {
    let chars: Vec<char> = t.chars().collect();
    let mut lo = 0;
    for &c in chars.iter().take(start) {
        if c != content {
            break;
        }
        lo += 1;
    }
    let mut hi = chars.len();
    for _ in 0..stop {
        if hi > lo && chars[hi - 1] == content {
            hi -= 1;
        } else {
            break;
        }
    }
    chars[lo..hi].iter().collect()
}
