//! Added tokens (`added_tokens` in tokenizer.json): special tokens such as
//! `<s>` or `<|im_end|>` and user-added ones. They are found in the input
//! before the model runs, as `tokenizers`' `AddedVocabulary` does:
//! leftmost-longest matching, first the tokens marked `normalized: false`
//! on the raw text, then those marked `normalized: true` (matched in their
//! normalized form) on each normalized stretch in between; with
//! `single_word` a match must not touch a word character (regex `\w`) on
//! either side; `lstrip`/`rstrip` swallow the whitespace beside it.

use super::fxhash::FxMap;
use super::json::{as_id, Obj};
use crate::error::Result;
use serde_json::Value;
use std::collections::HashSet;
use std::ops::Range;
use std::sync::OnceLock;

#[derive(Clone, Debug)]
pub(crate) struct AddedToken {
    pub content: String,
    pub single_word: bool,
    pub lstrip: bool,
    pub rstrip: bool,
    pub normalized: bool,
    pub special: bool,
}

impl AddedToken {
    pub fn from_json(v: &Value, at: &str) -> Result<(AddedToken, u32)> {
        let o = Obj::new(v, at)?;
        let id = as_id(o.map.get("id").ok_or_else(|| err!(FileFormat, "{}: missing", o.path("id")))?, &o.path("id"))?;
        let special = o.bool_or("special", false)?;
        let t = AddedToken {
            content: o.str("content")?.to_string(),
            single_word: o.bool_or("single_word", false)?,
            lstrip: o.bool_or("lstrip", false)?,
            rstrip: o.bool_or("rstrip", false)?,
            // `AddedToken::from(content, special)` defaults: normalized = !special.
            normalized: o.bool_or("normalized", !special)?,
            special,
        };
        Ok((t, id))
    }
}

/// Leftmost-longest matching of a set of strings (what `tokenizers` gets
/// from aho-corasick with `MatchKind::LeftmostLongest`): at the first byte
/// position where any pattern matches, the longest one; of equal ones the
/// first listed. Candidates are bucketed by first byte, longest first.
#[derive(Default)]
pub(crate) struct Matcher {
    /// (pattern, id, the token as `added_tokens_map_r[id]` has it).
    pats: Vec<(String, u32, AddedToken)>,
    /// Per first byte, the patterns starting with it, longest first.
    by_first: Vec<Vec<usize>>,
}

impl Matcher {
    fn new(pats: Vec<(String, u32, AddedToken)>) -> Matcher {
        let mut by_first: Vec<Vec<usize>> = vec![Vec::new(); 256];
        for (i, (p, _, _)) in pats.iter().enumerate() {
            if let Some(&b) = p.as_bytes().first() {
                by_first[b as usize].push(i);
            }
        }
        for v in by_first.iter_mut() {
            // Stable: equal lengths keep their listed order.
            v.sort_by_key(|&i| std::cmp::Reverse(pats[i].0.len()));
        }
        Matcher { pats, by_first }
    }

    fn is_empty(&self) -> bool {
        self.by_first.iter().all(Vec::is_empty)
    }

    /// The next match at or after byte `from`: (range, pattern index).
    fn find_from(&self, s: &str, from: usize) -> Option<(Range<usize>, usize)> {
        let bytes = s.as_bytes();
        for i in from..bytes.len() {
            let cands = &self.by_first[bytes[i] as usize];
            if !cands.is_empty() {
                for &k in cands {
                    let p = self.pats[k].0.as_bytes();
                    if bytes[i..].starts_with(p) {
                        return Some((i..i + p.len(), k));
                    }
                }
            }
        }
        None
    }
}

/// A stretch of text: an added token (its id) or text for the model.
pub(crate) enum Split {
    Token(u32),
    Text(Range<usize>),
}

pub(crate) struct AddedVocab {
    /// content → id (`added_tokens_map`).
    pub by_content: FxMap<String, u32>,
    /// id → the string `id_to_token` gives: the content, normalized for a
    /// `normalized` token (as `tokenizers` 0.23 returns it; "new  token"
    /// under a whitespace-collapsing normalizer comes back "new token").
    forms: FxMap<u32, String>,
    special: HashSet<String>,
    raw: Matcher,
    normalized: Matcher,
}

impl AddedVocab {
    /// Builds the vocabulary as `AddedVocabulary::add_tokens` does when
    /// `tokenizers` loads a file: a token already in the model vocabulary
    /// (or added before) keeps that id; another gets the next id after the
    /// model's and the added ones. The ids written in the file are not used
    /// (`tokenizers` only warns when they differ; so does liblora, through
    /// the log callback). `normalize` gives the normalized form of a
    /// `normalized` token's content, the form it is matched in.
    pub fn new(
        list: &[(AddedToken, u32)],
        model_vocab: &FxMap<String, u32>,
        mut normalize: impl FnMut(&str) -> Result<String>,
    ) -> Result<AddedVocab> {
        let mut special_order: Vec<AddedToken> = Vec::new();
        let mut special: HashSet<String> = HashSet::new();
        for (t, _) in list {
            if t.special && !t.content.is_empty() && special.insert(t.content.clone()) {
                special_order.push(t.clone());
            }
        }
        let mut by_content: FxMap<String, u32> = FxMap::default();
        let mut by_id_tok: FxMap<u32, AddedToken> = FxMap::default();
        let mut classic: Vec<AddedToken> = Vec::new();
        let model_size = model_vocab.len() as u64;
        for (t, file_id) in list {
            // An identical token already added (all of a content's entries
            // share one id, so looking at that id suffices).
            let dup = by_content.get(&t.content).and_then(|id| by_id_tok.get(id)).is_some_and(|v| same(v, t));
            if t.content.is_empty() || dup {
                continue;
            }
            let id = match by_content.get(&t.content).or_else(|| model_vocab.get(&t.content)) {
                Some(&id) => id as u64,
                None => match by_content.values().max() {
                    None => model_size,
                    Some(&max) if max as u64 >= model_size || model_size == 0 => max as u64 + 1,
                    Some(_) => model_size,
                },
            };
            if id > i32::MAX as u64 {
                bail!(FileFormat, "added token {:?} would get id {id}, past 2^31-1", t.content);
            }
            if id != *file_id as u64 {
                crate::log!(
                    Warn,
                    "tokenizer.json: added token {:?} is listed with id {file_id} but gets id {id}, as in `tokenizers`",
                    t.content
                );
            }
            let id = id as u32;
            by_content.insert(t.content.clone(), id);
            by_id_tok.insert(id, t.clone());
            if !special.contains(&t.content) {
                classic.push(t.clone());
            }
        }
        // The matching order: special tokens, then the others.
        let mut raw = Vec::new();
        let mut norm = Vec::new();
        for t in special_order.iter().chain(classic.iter()) {
            let id = by_content[&t.content];
            let flags = by_id_tok[&id].clone();
            let entry = AddedToken { content: t.content.clone(), ..flags };
            if t.normalized {
                norm.push((normalize(&t.content)?, id, entry));
            } else {
                raw.push((t.content.clone(), id, entry));
            }
        }
        let mut forms = FxMap::default();
        for (&id, t) in &by_id_tok {
            forms.insert(id, if t.normalized { normalize(&t.content)? } else { t.content.clone() });
        }
        Ok(AddedVocab {
            by_content,
            forms,
            special,
            raw: Matcher::new(raw),
            normalized: Matcher::new(norm),
        })
    }

    pub fn is_special(&self, content: &str) -> bool {
        self.special.contains(content)
    }

    /// The token string of an added id (see `forms`).
    pub fn content_of(&self, id: u32) -> Option<&str> {
        self.forms.get(&id).map(String::as_str)
    }

    /// Splits raw input at the `normalized: false` tokens.
    pub fn split_raw(&self, s: &str) -> Vec<Split> {
        self.split(s, &self.raw)
    }

    /// Splits normalized text at the `normalized: true` tokens.
    pub fn split_normalized(&self, s: &str) -> Vec<Split> {
        self.split(s, &self.normalized)
    }

    /// `AddedVocabulary::find_matches`; empty text pieces are dropped.
    fn split(&self, s: &str, m: &Matcher) -> Vec<Split> {
        let mut out = Vec::new();
        if m.is_empty() {
            if !s.is_empty() {
                out.push(Split::Text(0..s.len()));
            }
            return out;
        }
        let mut start_offset = 0;
        let mut search = 0;
        while let Some((r, k)) = m.find_from(s, search) {
            search = r.end;
            let (_, id, tok) = &m.pats[k];
            let (mut start, mut stop) = (r.start, r.end);
            if tok.single_word {
                let start_space = start == 0 || !ends_with_word(&s[..start]);
                let stop_space = stop == s.len() || !starts_with_word(&s[stop..]);
                if !start_space || !stop_space {
                    continue;
                }
            }
            if tok.lstrip {
                // The leftmost position of the whitespace run that ends at
                // `start` (regex `\s*$`; `\s` is Unicode White_Space, as
                // char::is_whitespace), not before the previous match.
                let newstart = s[..start].trim_end().len();
                start = newstart.max(start_offset);
            }
            if tok.rstrip {
                let rest = &s[stop..];
                stop += rest.len() - rest.trim_start().len();
            }
            if start_offset < start {
                out.push(Split::Text(start_offset..start));
            }
            out.push(Split::Token(*id));
            start_offset = stop;
        }
        if start_offset < s.len() {
            out.push(Split::Text(start_offset..s.len()));
        }
        out
    }
}

/// Two added tokens are the same when every field is (`AddedToken: Eq`).
fn same(a: &AddedToken, b: &AddedToken) -> bool {
    a.content == b.content
        && a.single_word == b.single_word
        && a.lstrip == b.lstrip
        && a.rstrip == b.rstrip
        && a.normalized == b.normalized
        && a.special == b.special
}

/// Regex `\w` (Unicode: alphabetic, marks, decimal digits, connector
/// punctuation, join controls) on one character, through the regex engine
/// so the classes are exactly `tokenizers`' (which uses the `regex` crate
/// here).
fn is_word_char(c: char) -> bool {
    static RE: OnceLock<fancy_regex::Regex> = OnceLock::new();
    let re = RE.get_or_init(|| fancy_regex::Regex::new(r"^\w$").expect("\\w compiles"));
    let mut buf = [0u8; 4];
    re.is_match(c.encode_utf8(&mut buf)).unwrap_or(false)
}

fn ends_with_word(s: &str) -> bool {
    s.chars().next_back().is_some_and(is_word_char)
}

fn starts_with_word(s: &str) -> bool {
    s.chars().next().is_some_and(is_word_char)
}
