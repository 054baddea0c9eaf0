//! Patterns (`{"String": ..}` or `{"Regex": ..}` in tokenizer.json), the
//! five split behaviors of `tokenizers`, and GPT-2's byte ↔ character map.
//!
//! Regexes run on `fancy-regex`: the Llama-3 and Qwen2 split patterns use a
//! negative lookahead (`\s+(?!\S)`), which the `regex` crate cannot express;
//! `tokenizers` runs them on Oniguruma, another backtracking engine with the
//! same leftmost-first (Perl) semantics, `\s` = Unicode White_Space and
//! `\p{L}`/`\p{N}` = the Unicode general categories.

use super::json::{kind, Obj};
use crate::error::Result;
use serde_json::Value;
use std::ops::Range;
use std::sync::OnceLock;

/// GPT-2's pre-tokenization regex, as `tokenizers`' ByteLevel uses it when
/// `use_regex` is true.
pub(crate) const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Backtracking steps a regex may take per match attempt. fancy-regex's
/// default (1e6) could be reached by a megabyte-long whitespace run (each
/// `\s*...` alternative scans the run and backs off); Oniguruma has no such
/// limit by default. This one only guards against pathological patterns.
const BACKTRACK_LIMIT: usize = 1 << 32;

pub(crate) enum Pattern {
    /// Matches the string literally (`tokenizers` escapes it into a regex).
    Literal(String),
    Regex(Box<fancy_regex::Regex>),
}

impl Pattern {
    /// Parses `{"String": s}` or `{"Regex": r}`.
    pub fn from_json(v: &Value, at: &str) -> Result<Pattern> {
        let o = Obj::new(v, at)?;
        if let Some(s) = o.opt_str("String")? {
            return Ok(Pattern::Literal(s.to_string()));
        }
        if let Some(r) = o.opt_str("Regex")? {
            return Ok(Pattern::Regex(Box::new(compile(r, at)?)));
        }
        bail!(FileFormat, "{at}: expected {{\"String\": ..}} or {{\"Regex\": ..}}, found {}", super::json::short(v))
    }

    /// Non-overlapping matches, left to right.
    pub fn matches(&self, s: &str) -> Result<Vec<Range<usize>>> {
        match self {
            Pattern::Literal(p) if p.is_empty() => Ok(Vec::new()),
            Pattern::Literal(p) => Ok(s.match_indices(p.as_str()).map(|(i, m)| i..i + m.len()).collect()),
            Pattern::Regex(re) => find_all(re, s),
        }
    }

    /// `s` with every match replaced by `content` (taken literally).
    pub fn replace_all(&self, s: &str, content: &str) -> Result<String> {
        if let Pattern::Literal(p) = self {
            if !p.is_empty() {
                return Ok(s.replace(p.as_str(), content));
            }
        }
        let mut out = String::with_capacity(s.len());
        let mut prev = 0;
        for m in self.matches(s)? {
            out.push_str(&s[prev..m.start]);
            out.push_str(content);
            prev = m.end;
        }
        out.push_str(&s[prev..]);
        Ok(out)
    }
}

pub(crate) fn compile(pattern: &str, at: &str) -> Result<fancy_regex::Regex> {
    fancy_regex::RegexBuilder::new(pattern)
        .backtrack_limit(BACKTRACK_LIMIT)
        .build()
        .map_err(|e| err!(Unsupported, "{at}: regex {pattern:?} is not supported: {e}"))
}

pub(crate) fn find_all(re: &fancy_regex::Regex, s: &str) -> Result<Vec<Range<usize>>> {
    let mut out = Vec::new();
    for m in re.find_iter(s) {
        let m = m.map_err(|e| err!(InvalidArgument, "regex {:?} failed on the input: {e}", re.as_str()))?;
        out.push(m.start()..m.end());
    }
    Ok(out)
}

/// The compiled GPT-2 pattern, shared by every ByteLevel pre-tokenizer.
pub(crate) fn gpt2_regex() -> &'static fancy_regex::Regex {
    static RE: OnceLock<fancy_regex::Regex> = OnceLock::new();
    RE.get_or_init(|| compile(GPT2_PATTERN, "ByteLevel").expect("GPT-2 pattern compiles"))
}

/// How a split treats the matched delimiters (`SplitDelimiterBehavior`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Behavior {
    Removed,
    Isolated,
    MergedWithPrevious,
    MergedWithNext,
    Contiguous,
}

impl Behavior {
    pub fn from_json(v: &Value, at: &str) -> Result<Behavior> {
        Ok(match v.as_str() {
            Some("Removed") => Behavior::Removed,
            Some("Isolated") => Behavior::Isolated,
            Some("MergedWithPrevious") => Behavior::MergedWithPrevious,
            Some("MergedWithNext") => Behavior::MergedWithNext,
            Some("Contiguous") => Behavior::Contiguous,
            Some(other) => bail!(Unsupported, "{at}: split behavior {other:?} is not one of Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous"),
            None => bail!(FileFormat, "{at}: expected a string, found {}", kind(v)),
        })
    }
}

/// Splits `s` at the matches of a pattern as `NormalizedString::split`:
/// `matches` are the pattern's matches; with `invert` the roles of matches
/// and gaps swap. Returns the byte ranges of the pieces, empty ones
/// included (the caller drops them, as `PreTokenizedString::split` does).
pub(crate) fn split_ranges(s: &str, matches: &[Range<usize>], invert: bool, behavior: Behavior) -> Vec<Range<usize>> {
    // (range, is_match) covering all of s, as `Pattern::find_matches`.
    let mut parts: Vec<(Range<usize>, bool)> = Vec::with_capacity(matches.len() * 2 + 1);
    if s.is_empty() {
        parts.push((0..0, false));
    } else {
        let mut prev = 0;
        for m in matches {
            if prev != m.start {
                parts.push((prev..m.start, false));
            }
            parts.push((m.clone(), true));
            prev = m.end;
        }
        if prev != s.len() {
            parts.push((prev..s.len(), false));
        }
    }
    if invert {
        for p in &mut parts {
            p.1 = !p.1;
        }
    }
    match behavior {
        Behavior::Isolated => parts.into_iter().map(|(r, _)| r).collect(),
        Behavior::Removed => parts.into_iter().filter(|(_, m)| !m).map(|(r, _)| r).collect(),
        Behavior::Contiguous => {
            let mut out: Vec<Range<usize>> = Vec::new();
            let mut prev_match = false;
            for (r, m) in parts {
                match out.last_mut() {
                    Some(last) if m == prev_match => last.end = r.end,
                    _ => out.push(r),
                }
                prev_match = m;
            }
            out
        }
        Behavior::MergedWithPrevious => {
            let mut out: Vec<Range<usize>> = Vec::new();
            let mut prev_match = false;
            for (r, m) in parts {
                match out.last_mut() {
                    Some(last) if m && !prev_match => last.end = r.end,
                    _ => out.push(r),
                }
                prev_match = m;
            }
            out
        }
        Behavior::MergedWithNext => {
            let mut out: Vec<Range<usize>> = Vec::new();
            let mut prev_match = false;
            for (r, m) in parts.into_iter().rev() {
                match out.last_mut() {
                    Some(last) if m && !prev_match => last.start = r.start,
                    _ => out.push(r),
                }
                prev_match = m;
            }
            out.reverse();
            out
        }
    }
}

/// GPT-2's `bytes_to_unicode`: every byte gets a printable character —
/// itself for `!`..`~`, `¡`..`¬`, `®`..`ÿ`, and U+0100 + k for the k-th
/// other byte in increasing order (so space 0x20 is `Ġ` U+0120).
pub(crate) fn byte_to_char() -> &'static [char; 256] {
    static MAP: OnceLock<[char; 256]> = OnceLock::new();
    MAP.get_or_init(|| {
        let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let mut map = ['\0'; 256];
        let mut n = 0;
        for b in 0..256u32 {
            map[b as usize] = if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            };
        }
        map
    })
}

/// The inverse of [`byte_to_char`]: the byte of a character, if it is one
/// of the 256 (all lie below U+0144).
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    static INV: OnceLock<[i16; 0x144]> = OnceLock::new();
    let inv = INV.get_or_init(|| {
        let mut inv = [-1i16; 0x144];
        for (b, c) in byte_to_char().iter().enumerate() {
            inv[*c as usize] = b as i16;
        }
        inv
    });
    inv.get(c as usize).and_then(|&b| u8::try_from(b).ok())
}

/// Maps each byte of `s` to its GPT-2 character (the ByteLevel transform).
pub(crate) fn to_byte_chars(s: &str, out: &mut String) {
    let map = byte_to_char();
    out.reserve(s.len() * 2);
    for b in s.bytes() {
        out.push(map[b as usize]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_gpt2s() {
        assert_eq!(byte_to_char()[b' ' as usize], 'Ġ');
        assert_eq!(byte_to_char()[b'\n' as usize], 'Ċ');
        assert_eq!(byte_to_char()[b'A' as usize], 'A');
        assert_eq!(byte_to_char()[0], 'Ā');
        assert_eq!(byte_to_char()[0xad], 'Ń'); // the last one, U+0143
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(byte_to_char()[b as usize]), Some(b));
        }
        assert_eq!(char_to_byte('é'), Some(0xe9));
        assert_eq!(char_to_byte(' '), None);
    }

    #[test]
    fn behaviors() {
        let s = "a-b--c";
        let m = Pattern::Literal("-".into()).matches(s).unwrap();
        let get = |b, inv| split_ranges(s, &m, inv, b).into_iter().map(|r| &s[r]).collect::<Vec<_>>();
        assert_eq!(get(Behavior::Removed, false), ["a", "b", "c"]);
        assert_eq!(get(Behavior::Isolated, false), ["a", "-", "b", "-", "-", "c"]);
        assert_eq!(get(Behavior::MergedWithPrevious, false), ["a-", "b-", "-", "c"]);
        assert_eq!(get(Behavior::MergedWithNext, false), ["a", "-b", "-", "-c"]);
        assert_eq!(get(Behavior::Contiguous, false), ["a", "-", "b", "--", "c"]);
        assert_eq!(get(Behavior::Removed, true), ["-", "-", "-"]);
    }
}
