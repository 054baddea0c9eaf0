//! Normalizers: the text transforms applied before pre-tokenization, to
//! each stretch of text between added tokens (and to the content of added
//! tokens marked `normalized`). Offsets are not tracked: liblora returns ids
//! only.

use super::json::Obj;
use super::pattern::Pattern;
use crate::error::Result;
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

pub(crate) enum Normalizer {
    Sequence(Vec<Normalizer>),
    /// Unicode canonical composition (Qwen2's tokenizers use it).
    Nfc,
    /// Puts the string in front of non-empty text (Llama-2's "▁").
    Prepend(String),
    /// Replaces every match of the pattern by the content (Llama-2's
    /// " " → "▁").
    Replace(Pattern, String),
}

/// The normalizer types this module knows, for messages.
const SUPPORTED: &str = "Sequence, NFC, Prepend, Replace";

impl Normalizer {
    pub fn from_json(v: &Value, at: &str) -> Result<Normalizer> {
        let o = Obj::new(v, at)?;
        Ok(match o.type_name()? {
            "Sequence" => {
                let items = o.array("normalizers")?;
                let mut out = Vec::with_capacity(items.len());
                for (i, n) in items.iter().enumerate() {
                    out.push(Normalizer::from_json(n, &format!("{at}.normalizers[{i}]"))?);
                }
                Normalizer::Sequence(out)
            }
            "NFC" => Normalizer::Nfc,
            "Prepend" => Normalizer::Prepend(o.str("prepend")?.to_string()),
            "Replace" => {
                let p = o.map.get("pattern").ok_or_else(|| err!(FileFormat, "{}: missing", o.path("pattern")))?;
                Normalizer::Replace(Pattern::from_json(p, &o.path("pattern"))?, o.str("content")?.to_string())
            }
            other => bail!(Unsupported, "{at}: normalizer type {other:?} is not supported (liblora supports {SUPPORTED})"),
        })
    }

    pub fn normalize(&self, s: String) -> Result<String> {
        Ok(match self {
            Normalizer::Sequence(items) => {
                let mut s = s;
                for n in items {
                    s = n.normalize(s)?;
                }
                s
            }
            Normalizer::Nfc => {
                if unicode_normalization::is_nfc_quick(s.chars()) == unicode_normalization::IsNormalized::Yes {
                    s
                } else {
                    s.nfc().collect()
                }
            }
            Normalizer::Prepend(p) => {
                if s.is_empty() {
                    s
                } else {
                    let mut out = String::with_capacity(p.len() + s.len());
                    out.push_str(p);
                    out.push_str(&s);
                    out
                }
            }
            Normalizer::Replace(pat, content) => pat.replace_all(&s, content)?,
        })
    }
}
