//! Pre-tokenizers: cut normalized text into the pieces the BPE model sees,
//! and for byte-level tokenizers map each byte to its GPT-2 character.

use super::json::Obj;
use super::pattern::{self, Behavior, Pattern};
use crate::error::Result;
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PrependScheme {
    Always,
    First,
    Never,
}

impl PrependScheme {
    pub fn from_json(o: &Obj) -> Result<PrependScheme> {
        // Older files have `add_prefix_space` instead (true → always).
        Ok(match o.opt_str("prepend_scheme")? {
            Some("always") => PrependScheme::Always,
            Some("first") => PrependScheme::First,
            Some("never") => PrependScheme::Never,
            Some(other) => bail!(FileFormat, "{}: {other:?} is not one of always, first, never", o.path("prepend_scheme")),
            None if o.bool_or("add_prefix_space", true)? => PrependScheme::Always,
            None => PrependScheme::Never,
        })
    }
}

pub(crate) enum PreTokenizer {
    Sequence(Vec<PreTokenizer>),
    /// Optionally a space in front, optionally GPT-2's regex split, then
    /// bytes → characters.
    ByteLevel { add_prefix_space: bool, use_regex: bool },
    Split { pattern: Pattern, behavior: Behavior, invert: bool },
    /// SentencePiece style: spaces become `replacement` (▁), one is put in
    /// front per `prepend`, and with `split` the text is cut before each ▁.
    Metaspace { replacement: char, prepend: PrependScheme, split: bool },
}

const SUPPORTED: &str = "Sequence, ByteLevel, Split, Metaspace";

impl PreTokenizer {
    pub fn from_json(v: &Value, at: &str) -> Result<PreTokenizer> {
        let o = Obj::new(v, at)?;
        Ok(match o.type_name()? {
            "Sequence" => {
                let items = o.array("pretokenizers")?;
                let mut out = Vec::with_capacity(items.len());
                for (i, p) in items.iter().enumerate() {
                    out.push(PreTokenizer::from_json(p, &format!("{at}.pretokenizers[{i}]"))?);
                }
                PreTokenizer::Sequence(out)
            }
            "ByteLevel" => PreTokenizer::ByteLevel {
                add_prefix_space: o.bool_or("add_prefix_space", true)?,
                use_regex: o.bool_or("use_regex", true)?,
            },
            "Split" => {
                let p = o.map.get("pattern").ok_or_else(|| err!(FileFormat, "{}: missing", o.path("pattern")))?;
                let b = o.map.get("behavior").ok_or_else(|| err!(FileFormat, "{}: missing", o.path("behavior")))?;
                PreTokenizer::Split {
                    pattern: Pattern::from_json(p, &o.path("pattern"))?,
                    behavior: Behavior::from_json(b, &o.path("behavior"))?,
                    invert: o.bool_or("invert", false)?,
                }
            }
            "Metaspace" => PreTokenizer::Metaspace {
                replacement: o.char("replacement")?,
                prepend: PrependScheme::from_json(&o)?,
                split: o.bool_or("split", true)?,
            },
            other => bail!(Unsupported, "{at}: pre-tokenizer type {other:?} is not supported (liblora supports {SUPPORTED})"),
        })
    }

    /// Cuts `text` into pieces and calls `f(piece, at_start)` for each
    /// non-empty one, in order. `at_start`: the piece begins at offset 0 of
    /// the original input. Pieces are handed over as they are made (no list
    /// of strings is built: encoding a megabyte makes ~10^5 pieces).
    pub fn for_each(&self, text: &str, at_start: bool, f: &mut dyn FnMut(&str, bool) -> Result<()>) -> Result<()> {
        match self {
            PreTokenizer::Sequence(items) => seq(items, text, at_start, f),
            PreTokenizer::ByteLevel { add_prefix_space, use_regex } => {
                let spaced;
                let text = if *add_prefix_space && !text.starts_with(' ') {
                    spaced = format!(" {text}");
                    spaced.as_str()
                } else {
                    text
                };
                let mut mapped = String::new();
                let mut emit = |r: std::ops::Range<usize>| -> Result<()> {
                    mapped.clear();
                    pattern::to_byte_chars(&text[r.clone()], &mut mapped);
                    f(&mapped, at_start && r.start == 0)
                };
                if *use_regex {
                    let m = pattern::find_all(pattern::gpt2_regex(), text)?;
                    for r in pattern::split_ranges(text, &m, false, Behavior::Isolated) {
                        if !r.is_empty() {
                            emit(r)?;
                        }
                    }
                    Ok(())
                } else if text.is_empty() {
                    Ok(())
                } else {
                    emit(0..text.len())
                }
            }
            PreTokenizer::Split { pattern, behavior, invert } => {
                let m = pattern.matches(text)?;
                for r in pattern::split_ranges(text, &m, *invert, *behavior) {
                    if !r.is_empty() {
                        f(&text[r.clone()], at_start && r.start == 0)?;
                    }
                }
                Ok(())
            }
            PreTokenizer::Metaspace { replacement, prepend, split } => {
                let mut rep = [0u8; 4];
                let rep: &str = replacement.encode_utf8(&mut rep);
                let mut text = text.replace(' ', rep);
                let add = match prepend {
                    PrependScheme::Always => !text.starts_with(*replacement),
                    PrependScheme::First => !text.starts_with(*replacement) && at_start,
                    PrependScheme::Never => false,
                };
                if add {
                    text.insert_str(0, rep);
                }
                if *split {
                    let m: Vec<_> = text.match_indices(*replacement).map(|(i, s)| i..i + s.len()).collect();
                    for r in pattern::split_ranges(&text, &m, false, Behavior::MergedWithNext) {
                        if !r.is_empty() {
                            f(&text[r.clone()], at_start && r.start == 0)?;
                        }
                    }
                    Ok(())
                } else if text.is_empty() {
                    Ok(())
                } else {
                    f(&text, at_start)
                }
            }
        }
    }
}

/// A Sequence: each piece of the first pre-tokenizer goes through the rest.
fn seq(items: &[PreTokenizer], text: &str, at_start: bool, f: &mut dyn FnMut(&str, bool) -> Result<()>) -> Result<()> {
    match items.split_first() {
        None => {
            if text.is_empty() {
                Ok(())
            } else {
                f(text, at_start)
            }
        }
        Some((first, rest)) => first.for_each(text, at_start, &mut |p, s| seq(rest, p, s, f)),
    }
}
