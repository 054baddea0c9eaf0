//! Typed access to the JSON of `tokenizer.json`, with messages that name the
//! path of the offending field (`model.vocab`, `pre_tokenizer.pretokenizers[1]`).
//! A wrong type is `FileFormat`; an unknown component is `Unsupported`
//! (raised by the callers, which know the supported names).

use crate::error::Result;
use serde_json::{Map, Value};

/// A JSON object and where it sits in the file.
#[derive(Clone, Copy)]
pub(crate) struct Obj<'a> {
    pub map: &'a Map<String, Value>,
    pub at: &'a str,
}

impl<'a> Obj<'a> {
    pub fn new(v: &'a Value, at: &'a str) -> Result<Obj<'a>> {
        match v {
            Value::Object(map) => Ok(Obj { map, at }),
            other => bail!(FileFormat, "{at}: expected an object, found {}", kind(other)),
        }
    }

    /// The field, or None when absent or null.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn path(&self, key: &str) -> String {
        format!("{}.{key}", self.at)
    }

    /// The `type` tag of a component.
    pub fn type_name(&self) -> Result<&'a str> {
        match self.get("type") {
            Some(Value::String(s)) => Ok(s),
            Some(other) => bail!(FileFormat, "{}: expected a string, found {}", self.path("type"), kind(other)),
            None => bail!(FileFormat, "{}: has no \"type\"", self.at),
        }
    }

    pub fn str(&self, key: &str) -> Result<&'a str> {
        self.opt_str(key)?.ok_or_else(|| err!(FileFormat, "{}: missing", self.path(key)))
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => bail!(FileFormat, "{}: expected a string, found {}", self.path(key), kind(other)),
        }
    }

    /// A boolean field; `default` when absent or null.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => bail!(FileFormat, "{}: expected a boolean, found {}", self.path(key), kind(other)),
        }
    }

    /// A non-negative integer field; `default` when absent or null.
    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => as_usize(v, &self.path(key)),
        }
    }

    /// A single-character field (a Metaspace replacement, a Strip content).
    pub fn char(&self, key: &str) -> Result<char> {
        let s = self.str(key)?;
        let mut it = s.chars();
        match (it.next(), it.next()) {
            (Some(c), None) => Ok(c),
            _ => bail!(FileFormat, "{}: expected one character, found {s:?}", self.path(key)),
        }
    }

    pub fn array(&self, key: &str) -> Result<&'a Vec<Value>> {
        match self.get(key) {
            Some(Value::Array(a)) => Ok(a),
            Some(other) => bail!(FileFormat, "{}: expected an array, found {}", self.path(key), kind(other)),
            None => bail!(FileFormat, "{}: missing", self.path(key)),
        }
    }
}

pub(crate) fn as_usize(v: &Value, at: &str) -> Result<usize> {
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| err!(FileFormat, "{at}: expected a non-negative integer, found {}", short(v)))
}

/// A token id: a non-negative integer below 2^31 (ids cross the C API as
/// `int32_t`).
pub(crate) fn as_id(v: &Value, at: &str) -> Result<u32> {
    match v.as_u64() {
        Some(n) if n <= i32::MAX as u64 => Ok(n as u32),
        _ => bail!(FileFormat, "{at}: expected a token id (0 to 2^31-1), found {}", short(v)),
    }
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value for a message, cut to a readable length.
pub(crate) fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() <= 60 {
        return s;
    }
    let mut n = 57;
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    format!("{}...", &s[..n])
}
