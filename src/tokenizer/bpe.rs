//! The BPE model, as `tokenizers`' `models::bpe::BPE` (without dropout).
//!
//! A piece is split into characters, each looked up in the vocabulary
//! (else its bytes as `<0xXX>` tokens with `byte_fallback`, else the unknown
//! token, fused with a preceding one when `fuse_unk`, else dropped). Then
//! merges are applied lowest rank first — of equal ranks, leftmost first —
//! until none applies: a min-heap of candidate pairs `(rank, position)` over
//! a doubly linked list of symbols; entries made stale by an earlier merge
//! are recognized and skipped when popped. O(n log n) for a piece of n
//! characters. Pieces shorter than 256 bytes are cached (up to 10,000), as
//! `tokenizers` does; the cache changes speed only, never results.

use super::fxhash::{map_with_capacity, FxMap};
use super::json::{as_id, short, Obj};
use crate::error::Result;
use parking_lot::RwLock;
use serde_json::Value;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::fmt::Write;

/// Pieces at least this long (bytes) are not cached (`tokenizers`' MAX_LENGTH).
const CACHE_MAX_LEN: usize = 256;
/// Cached pieces at most (`tokenizers`' DEFAULT_CACHE_CAPACITY); when full,
/// new pieces are not cached.
const CACHE_CAPACITY: usize = 10_000;

pub(crate) struct Bpe {
    pub vocab: FxMap<String, u32>,
    pub vocab_r: FxMap<u32, String>,
    /// [`pair`]`(left id, right id)` → (rank, merged id).
    merges: FxMap<u64, (u32, u32)>,
    /// Single-character tokens, the common case of the initial split.
    char_ids: FxMap<char, u32>,
    unk_token: Option<String>,
    fuse_unk: bool,
    /// `<0x00>`..`<0xFF>` ids, when `byte_fallback` is on.
    byte_ids: Option<Box<[Option<u32>; 256]>>,
    ignore_merges: bool,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    cache: RwLock<HashMap<String, Vec<u32>>>,
}

impl Bpe {
    /// Parses a `"model"` object of type BPE (the caller checked the type).
    pub fn from_json(o: &Obj) -> Result<Bpe> {
        if let Some(d) = o.get("dropout") {
            let p = d.as_f64().ok_or_else(|| err!(FileFormat, "{}: expected a number, found {}", o.path("dropout"), short(d)))?;
            if p != 0.0 {
                bail!(Unsupported, "{}: BPE dropout {p} is not supported (encoding would be random)", o.path("dropout"));
            }
        }
        let vocab_v = o.map.get("vocab").ok_or_else(|| err!(FileFormat, "{}: missing", o.path("vocab")))?;
        let vocab_o = Obj::new(vocab_v, "model.vocab")?;
        let mut vocab = map_with_capacity(vocab_o.map.len());
        let mut vocab_r = map_with_capacity(vocab_o.map.len());
        for (tok, id) in vocab_o.map {
            let id = match id.as_u64() {
                Some(n) if n <= i32::MAX as u64 => n as u32,
                _ => as_id(id, &format!("model.vocab[{tok:?}]"))?, // the error
            };
            vocab.insert(tok.clone(), id);
            vocab_r.insert(id, tok.clone());
        }
        let prefix = o.opt_str("continuing_subword_prefix")?.map(str::to_string);
        let suffix = o.opt_str("end_of_word_suffix")?.map(str::to_string);
        let merges = parse_merges(o.array("merges")?, &vocab, prefix.as_deref().unwrap_or(""))?;
        let char_ids = vocab
            .iter()
            .filter_map(|(t, &id)| {
                let mut it = t.chars();
                match (it.next(), it.next()) {
                    (Some(c), None) => Some((c, id)),
                    _ => None,
                }
            })
            .collect();
        let byte_ids = if o.bool_or("byte_fallback", false)? {
            let mut ids = Box::new([None; 256]);
            for (b, slot) in ids.iter_mut().enumerate() {
                *slot = vocab.get(&format!("<0x{b:02X}>")).copied();
            }
            Some(ids)
        } else {
            None
        };
        Ok(Bpe {
            vocab,
            vocab_r,
            merges,
            char_ids,
            unk_token: o.opt_str("unk_token")?.map(str::to_string),
            fuse_unk: o.bool_or("fuse_unk", false)?,
            byte_ids,
            ignore_merges: o.bool_or("ignore_merges", false)?,
            continuing_subword_prefix: prefix,
            end_of_word_suffix: suffix,
            cache: RwLock::new(HashMap::new()),
        })
    }

    /// Appends the ids of `piece` to `out`.
    pub fn tokenize(&self, piece: &str, out: &mut Vec<u32>) -> Result<()> {
        if piece.is_empty() {
            return Ok(());
        }
        if self.ignore_merges {
            if let Some(&id) = self.vocab.get(piece) {
                out.push(id);
                return Ok(());
            }
        }
        let cacheable = piece.len() < CACHE_MAX_LEN;
        if cacheable {
            if let Some(cache) = self.cache.try_read() {
                if let Some(ids) = cache.get(piece) {
                    out.extend_from_slice(ids);
                    return Ok(());
                }
            }
        }
        let ids = self.merge_word(piece)?;
        out.extend_from_slice(&ids);
        if cacheable {
            if let Some(mut cache) = self.cache.try_write() {
                if cache.len() < CACHE_CAPACITY {
                    cache.insert(piece.to_string(), ids);
                }
            }
        }
        Ok(())
    }

    fn unk_id(&self, unk: &str) -> Result<u32> {
        self.vocab
            .get(unk)
            .copied()
            .ok_or_else(|| err!(FileFormat, "model.unk_token {unk:?} is not in the vocabulary (needed for a character outside it)"))
    }

    /// The initial symbols of a piece, then all merges.
    fn merge_word(&self, w: &str) -> Result<Vec<u32>> {
        let mut syms: Vec<u32> = Vec::with_capacity(w.len());
        // (id, byte length) of a pending unknown token, fused or not.
        let mut unk: Option<u32> = None;
        let plain = self.continuing_subword_prefix.is_none() && self.end_of_word_suffix.is_none();
        let mut iter = w.char_indices().peekable();
        let mut buf = String::new();
        while let Some((i, c)) = iter.next() {
            let is_last = iter.peek().is_none();
            let found = if plain {
                self.char_ids.get(&c).copied()
            } else {
                buf.clear();
                if i != 0 {
                    if let Some(p) = &self.continuing_subword_prefix {
                        buf.push_str(p);
                    }
                }
                buf.push(c);
                if is_last {
                    if let Some(s) = &self.end_of_word_suffix {
                        buf.push_str(s);
                    }
                }
                self.vocab.get(&buf).copied()
            };
            if let Some(id) = found {
                if let Some(u) = unk.take() {
                    syms.push(u);
                }
                syms.push(id);
                continue;
            }
            if let Some(bytes) = &self.byte_ids {
                // `tokenizers` looks up the bytes of the symbol string, which
                // includes the prefix/suffix when those are set.
                let mut cbuf = [0u8; 4];
                let s: &str = if plain { c.encode_utf8(&mut cbuf) } else { &buf };
                let ids: Option<Vec<u32>> = s.bytes().map(|b| bytes[b as usize]).collect();
                if let Some(ids) = ids {
                    // Byte tokens do not flush a pending unknown token
                    // (as `tokenizers`: they are added straight to the word).
                    syms.extend(ids);
                    continue;
                }
            }
            if let Some(u) = &self.unk_token {
                let id = self.unk_id(u)?;
                match unk {
                    Some(_) if self.fuse_unk => {}
                    Some(prev) => {
                        syms.push(prev);
                        unk = Some(id);
                    }
                    None => unk = Some(id),
                }
            }
            // No unknown token: the character is dropped, as `tokenizers` does.
        }
        if let Some(u) = unk {
            syms.push(u);
        }
        if syms.len() >= NONE as usize {
            // Symbol links are u32.
            bail!(InvalidArgument, "a piece of {} symbols is too long to encode (at most 2^32-2)", syms.len());
        }
        Ok(self.merge_all(syms))
    }

    fn merge_all(&self, ids: Vec<u32>) -> Vec<u32> {
        if ids.len() < 2 || self.merges.is_empty() {
            return ids;
        }
        let n = ids.len();
        let mut sym: Vec<Symbol> = ids
            .iter()
            .enumerate()
            .map(|(i, &c)| Symbol { id: c, prev: if i == 0 { NONE } else { i as u32 - 1 }, next: if i + 1 < n { i as u32 + 1 } else { NONE } })
            .collect();
        // Heapify the initial pairs at once (O(n)) rather than push by push.
        let initial: Vec<Merge> = (0..n - 1)
            .filter_map(|i| self.merges.get(&pair(ids[i], ids[i + 1])).map(|&(rank, new_id)| Merge::new(rank, i as u32, new_id)))
            .collect();
        let mut heap = BinaryHeap::from(initial);
        while let Some(top) = heap.pop() {
            let pos = top.pos() as usize;
            let cur = sym[pos];
            if cur.id == DEAD || cur.next == NONE {
                continue;
            }
            let next_pos = cur.next as usize;
            let right = sym[next_pos];
            // Stale entry: the pair at this position changed since it was queued.
            match self.merges.get(&pair(cur.id, right.id)) {
                Some(&(_, id)) if id == top.new_id => {}
                _ => continue,
            }
            sym[pos].id = top.new_id;
            sym[pos].next = right.next;
            sym[next_pos].id = DEAD;
            if right.next != NONE {
                sym[right.next as usize].prev = pos as u32;
            }
            let cur = sym[pos];
            if cur.prev != NONE {
                let p = cur.prev as usize;
                if let Some(&(rank, new_id)) = self.merges.get(&pair(sym[p].id, cur.id)) {
                    heap.push(Merge::new(rank, p as u32, new_id));
                }
            }
            if cur.next != NONE {
                if let Some(&(rank, new_id)) = self.merges.get(&pair(cur.id, sym[cur.next as usize].id)) {
                    heap.push(Merge::new(rank, pos as u32, new_id));
                }
            }
        }
        sym.iter().filter(|s| s.id != DEAD).map(|s| s.id).collect()
    }
}

/// No neighbour (a link of [`Symbol`]).
const NONE: u32 = u32::MAX;
/// The id of a symbol merged into its left neighbour. Ids are below 2^31
/// (checked at load), so this never names a token.
const DEAD: u32 = u32::MAX;

/// The key of a merge: both ids in one word (one hash step).
#[inline]
fn pair(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

/// A symbol of a word being merged, linked to its live neighbours.
#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    prev: u32,
    next: u32,
}

/// A candidate merge in the heap: `key` = rank · 2^32 + position, so the
/// smallest key is the lowest rank and, of equal ranks, the leftmost pair.
#[derive(PartialEq, Eq)]
struct Merge {
    key: u64,
    new_id: u32,
}

impl Merge {
    #[inline]
    fn new(rank: u32, pos: u32, new_id: u32) -> Merge {
        Merge { key: ((rank as u64) << 32) | pos as u64, new_id }
    }
    #[inline]
    fn pos(&self) -> u32 {
        self.key as u32
    }
}

impl Ord for Merge {
    /// Reversed, so std's max-heap pops the smallest key first.
    fn cmp(&self, other: &Self) -> Ordering {
        other.key.cmp(&self.key)
    }
}

impl PartialOrd for Merge {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Merges as `"a b"` strings (split at the one space) or `["a", "b"]` pairs;
/// rank = position in the list (a pair listed twice keeps the later rank, as
/// `tokenizers`' map collection does).
fn parse_merges(list: &[Value], vocab: &FxMap<String, u32>, prefix: &str) -> Result<FxMap<u64, (u32, u32)>> {
    let mut out = map_with_capacity(list.len());
    let mut joined = String::new();
    for (rank, m) in list.iter().enumerate() {
        let at = || format!("model.merges[{rank}]");
        let (a, b): (&str, &str) = match m {
            Value::String(s) => {
                let mut parts = s.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => (a, b),
                    _ => bail!(FileFormat, "{}: {s:?} is not two tokens separated by one space", at()),
                }
            }
            Value::Array(pair) => match pair.as_slice() {
                [Value::String(a), Value::String(b)] => (a, b),
                _ => bail!(FileFormat, "{}: expected a pair of strings, found {}", at(), short(m)),
            },
            other => bail!(FileFormat, "{}: expected a string or a pair of strings, found {}", at(), short(other)),
        };
        let id = |t: &str| vocab.get(t).copied().ok_or_else(|| err!(FileFormat, "{}: token {t:?} is not in the vocabulary", at()));
        let (ia, ib) = (id(a)?, id(b)?);
        let rest = b.strip_prefix(prefix).unwrap_or(b);
        joined.clear();
        let _ = write!(joined, "{a}{rest}");
        let merged = id(&joined)?;
        let rank = u32::try_from(rank).map_err(|_| err!(FileFormat, "model.merges: too many merges"))?;
        out.insert(pair(ia, ib), (rank, merged));
    }
    Ok(out)
}
