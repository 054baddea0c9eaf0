//! PEFT LoRA adapters on a [`Model`]: which modules an adapter targets
//! (PEFT 0.21 `check_target_module_exists`, `get_pattern_key`), and the
//! adapter directory format (`adapter_config.json` +
//! `adapter_model.safetensors`, keys
//! `base_model.model.<module>.lora_{A,B}.weight`, fp32, no adapter name in
//! the key).
//!
//! Matching, for a module key such as `model.layers.3.self_attn.q_proj`:
//! - `target_modules` a string: the key must fully match it as a regex;
//!   `"all-linear"`: every linear layer but the output head;
//! - a list: the key equals an entry or ends with `.entry`; then, if
//!   `layers_to_transform` is set, the layer index (the first number after
//!   `layers_pattern`, or after any segment) must be listed;
//! - `exclude_modules` (string regex or list) removes matches;
//! - `rank_pattern` / `alpha_pattern`: the first key `p` (in sorted order,
//!   which is the file's order for every file PEFT writes: it writes with
//!   `sort_keys=True`) with `re.match(r"(.*\.)?(p)$", key)` gives the
//!   module's rank / alpha.
//!
//! `tests/fixtures/peft_configs` holds PEFT's own resolution of files using
//! each of these options; `tests/model_api.rs` compares.

use super::{linears, Model, FUSED_LINEARS, LINEARS};
use crate::io::safetensors::{write_atomic, OutTensor, StFile};
use crate::lora::layer::Init;
use crate::Result;
use regex::Regex;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::Path;

/// Which modules an adapter targets.
#[derive(Clone, Debug)]
pub enum Targets {
    /// PEFT's `"all-linear"`.
    AllLinear,
    /// A regex that must match the whole module key.
    Regex(String),
    /// Names: a module matches if its key equals one or ends with `.name`.
    Names(Vec<String>),
}

/// An adapter's PEFT configuration.
#[derive(Clone, Debug)]
pub struct AdapterSpec {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub use_rslora: bool,
    pub init: Init,
    pub targets: Targets,
    pub exclude: Option<Targets>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Option<Vec<String>>,
    /// (pattern, rank), in order.
    pub rank_pattern: Vec<(String, usize)>,
    /// (pattern, alpha), in order.
    pub alpha_pattern: Vec<(String, f32)>,
    pub base_model_name_or_path: Option<String>,
}

impl AdapterSpec {
    /// r, alpha, all-linear, no dropout, PEFT's default init.
    pub fn new(r: usize, alpha: f32) -> AdapterSpec {
        AdapterSpec {
            r,
            alpha,
            dropout: 0.0,
            use_rslora: false,
            init: Init::KaimingUniform,
            targets: Targets::AllLinear,
            exclude: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            base_model_name_or_path: None,
        }
    }

    /// Parses the C API's target string: `"all-linear"`, a comma-separated
    /// list of names (`"q_proj,v_proj"`), or `"re:<regex>"` for PEFT's
    /// string (regex) form.
    pub fn parse_targets(s: &str) -> Result<Targets> {
        let s = s.trim();
        if s.is_empty() {
            bail!(InvalidArgument, "target modules are empty (use \"all-linear\" or names such as \"q_proj,v_proj\")");
        }
        if s == "all-linear" {
            return Ok(Targets::AllLinear);
        }
        if let Some(re) = s.strip_prefix("re:") {
            Regex::new(&format!("^(?:{re})$")).map_err(|e| err!(InvalidArgument, "target regex '{re}': {e}"))?;
            return Ok(Targets::Regex(re.to_string()));
        }
        let names: Vec<String> = s.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect();
        Ok(Targets::Names(names))
    }

    /// Parses `"name=value,name=value"` pattern lists (C API).
    pub fn parse_pattern<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<(String, T)>> {
        let mut v = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, val) = part.split_once('=').ok_or_else(|| err!(InvalidArgument, "{what} entry '{part}' is not pattern=value"))?;
            let val = val.trim().parse::<T>().map_err(|_| err!(InvalidArgument, "{what} entry '{part}': '{val}' is not a valid value"))?;
            v.push((k.trim().to_string(), val));
        }
        Ok(v)
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail!(InvalidArgument, "rank 0: r must be at least 1");
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!(InvalidArgument, "alpha {} must be positive and finite", self.alpha);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!(InvalidArgument, "dropout {} is outside [0, 1)", self.dropout);
        }
        for (p, r) in &self.rank_pattern {
            check_pattern(p)?;
            if *r == 0 {
                bail!(InvalidArgument, "rank_pattern '{p}' gives rank 0");
            }
        }
        for (p, a) in &self.alpha_pattern {
            check_pattern(p)?;
            if !(a.is_finite() && *a > 0.0) {
                bail!(InvalidArgument, "alpha_pattern '{p}' gives alpha {a}");
            }
        }
        if let Targets::Names(n) = &self.targets {
            if n.is_empty() {
                bail!(InvalidArgument, "target modules list is empty");
            }
            for name in n {
                let leaf = name.rsplit('.').next().unwrap_or(name);
                if !LINEARS.contains(&leaf) && !FUSED_LINEARS.contains(&leaf) {
                    bail!(Unsupported, "target module '{name}' is not one of the decoder's linear layers ({}, or Phi-3's {}); adapters on embeddings or lm_head are not supported", LINEARS.join(", "), FUSED_LINEARS.join(", "));
                }
            }
        }
        if let Targets::Regex(r) = &self.targets {
            Regex::new(&format!("^(?:{r})$")).map_err(|e| err!(InvalidArgument, "target regex '{r}': {e}"))?;
        }
        Ok(())
    }

    pub fn targets_display(&self) -> String {
        match &self.targets {
            Targets::AllLinear => "\"all-linear\"".into(),
            Targets::Regex(r) => format!("regex '{r}'"),
            Targets::Names(n) => format!("{n:?}"),
        }
    }

    /// Whether module `path` (leaf `leaf`, in layer `layer`) is targeted.
    pub fn targets(&self, layer: usize, leaf: &str, path: &str) -> bool {
        if let Some(ex) = &self.exclude {
            if matches_targets(ex, path) {
                return false;
            }
        }
        let _ = leaf;
        match &self.targets {
            Targets::AllLinear => self.layer_ok(layer, path),
            Targets::Regex(_) => matches_targets(&self.targets, path),
            Targets::Names(_) => matches_targets(&self.targets, path) && self.layer_ok(layer, path),
        }
    }

    fn layer_ok(&self, layer: usize, path: &str) -> bool {
        let Some(ls) = &self.layers_to_transform else { return true };
        if ls.is_empty() {
            return true;
        }
        // Without a pattern PEFT takes the first number after two segments
        // (`.*?\.[^.]*\.(\d+)\.`): `layer` for our `model.layers.{i}.…`
        // keys. With patterns, the first one whose regex
        // `(?:^|.*?\.){p}\.(?P<idx>\d+)\.` matches at the start decides
        // (no index in that match: not targeted).
        let idx = match &self.layers_pattern {
            None => Some(layer),
            Some(ps) if ps.is_empty() => Some(layer),
            Some(ps) => ps
                .iter()
                .find_map(|p| Regex::new(&format!(r"^(?:^|.*?\.){p}\.(?P<idx>\d+)\.")).ok().and_then(|re| re.captures(path)))
                .and_then(|c| c.name("idx").and_then(|m| m.as_str().parse::<usize>().ok())),
        };
        idx.is_some_and(|i| ls.contains(&i))
    }

    pub fn rank_for(&self, path: &str) -> usize {
        pattern_value(&self.rank_pattern, path).unwrap_or(self.r)
    }

    pub fn alpha_for(&self, path: &str) -> f32 {
        pattern_value(&self.alpha_pattern, path).unwrap_or(self.alpha)
    }

    /// `adapter_config.json` as PEFT 0.21 writes it: `target_modules` is
    /// the sorted list of names for the list form, the sorted full module
    /// paths PEFT resolves `all-linear` to, or the regex string.
    pub fn to_config_json(&self, matched_paths: &[String]) -> Value {
        let targets: Value = match &self.targets {
            Targets::Regex(r) => Value::String(r.clone()),
            Targets::Names(n) => {
                let mut v: Vec<&str> = n.iter().map(|s| s.as_str()).collect();
                v.sort();
                v.dedup();
                json!(v)
            }
            Targets::AllLinear => {
                let mut v: Vec<&str> = matched_paths.iter().map(|s| s.as_str()).collect();
                v.sort();
                json!(v)
            }
        };
        let rp: Map<String, Value> = self.rank_pattern.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        let ap: Map<String, Value> = self.alpha_pattern.iter().map(|(k, v)| (k.clone(), json!(py_num(*v)))).collect();
        json!({
            "alpha_pattern": ap,
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "exclude_modules": match &self.exclude { None => Value::Null, Some(Targets::Regex(r)) => json!(r), Some(Targets::Names(n)) => json!(n), Some(Targets::AllLinear) => Value::Null },
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": match self.init { Init::Gaussian => json!("gaussian"), _ => json!(true) },
            "layer_replication": null,
            "layers_pattern": self.layers_pattern,
            "layers_to_transform": self.layers_to_transform,
            "lora_alpha": py_num(self.alpha),
            "lora_bias": false,
            "lora_dropout": f32_as_py(self.dropout),
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": rp,
            "revision": null,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": self.use_rslora,
        })
    }

    /// Reads `adapter_config.json`, refusing (by name) every option that
    /// would change what the adapter computes and that liblora does not
    /// implement.
    pub fn from_config_json(v: &Value) -> Result<AdapterSpec> {
        let m = v.as_object().ok_or_else(|| err!(FileFormat, "adapter_config.json is not an object"))?;
        let s = |k: &str| m.get(k).and_then(|x| x.as_str());
        if s("peft_type").unwrap_or("LORA") != "LORA" {
            bail!(Unsupported, "adapter_config.json: peft_type '{}' is not supported (LORA is)", s("peft_type").unwrap_or(""));
        }
        let truthy = |k: &str| match m.get(k) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
            Some(Value::String(s)) => !s.is_empty(),
            _ => true,
        };
        for k in ["use_dora", "lora_bias", "modules_to_save", "layer_replication", "trainable_token_indices", "target_parameters", "use_qalora", "alora_invocation_tokens", "megatron_config", "fan_in_fan_out", "use_bdlora"] {
            if truthy(k) {
                bail!(Unsupported, "adapter_config.json: `{k}` = {} is not supported", m[k]);
            }
        }
        if let Some(b) = s("bias") {
            if b != "none" {
                bail!(Unsupported, "adapter_config.json: bias '{b}' is not supported (none is)");
            }
        }
        let r = m.get("r").and_then(|x| x.as_u64()).ok_or_else(|| err!(FileFormat, "adapter_config.json: no integer `r`"))? as usize;
        let alpha = m.get("lora_alpha").and_then(|x| x.as_f64()).unwrap_or(8.0) as f32;
        let dropout = m.get("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0) as f32;
        let to_targets = |v: &Value, what: &str| -> Result<Option<Targets>> {
            Ok(match v {
                Value::Null => None,
                Value::String(x) if x == "all-linear" => Some(Targets::AllLinear),
                Value::String(x) => Some(Targets::Regex(x.clone())),
                Value::Array(a) => Some(Targets::Names(a.iter().map(|x| x.as_str().map(String::from).ok_or_else(|| err!(FileFormat, "adapter_config.json: `{what}` entry {x} is not a string"))).collect::<Result<_>>()?)),
                o => bail!(FileFormat, "adapter_config.json: `{what}` is {o}"),
            })
        };
        // No target_modules: PEFT takes the architecture's default
        // (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), q_proj and
        // v_proj wherever it has one (load_adapter refuses the others).
        let targets = to_targets(m.get("target_modules").unwrap_or(&Value::Null), "target_modules")?
            .unwrap_or_else(|| Targets::Names(vec!["q_proj".into(), "v_proj".into()]));
        let exclude = to_targets(m.get("exclude_modules").unwrap_or(&Value::Null), "exclude_modules")?;
        let layers_to_transform = match m.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(vec![n.as_u64().ok_or_else(|| err!(FileFormat, "adapter_config.json: layers_to_transform {n}"))? as usize]),
            Some(Value::Array(a)) => Some(a.iter().map(|x| x.as_u64().map(|v| v as usize).ok_or_else(|| err!(FileFormat, "adapter_config.json: layers_to_transform entry {x}"))).collect::<Result<_>>()?),
            Some(o) => bail!(FileFormat, "adapter_config.json: layers_to_transform is {o}"),
        };
        let layers_pattern = match m.get("layers_pattern") {
            None | Some(Value::Null) => None,
            Some(Value::String(p)) => Some(vec![p.clone()]),
            Some(Value::Array(a)) => Some(a.iter().filter_map(|x| x.as_str().map(String::from)).collect()),
            Some(o) => bail!(FileFormat, "adapter_config.json: layers_pattern is {o}"),
        };
        let obj_pairs = |k: &str| -> Vec<(String, f64)> {
            m.get(k).and_then(|x| x.as_object()).map(|o| o.iter().filter_map(|(k, v)| v.as_f64().map(|f| (k.clone(), f))).collect()).unwrap_or_default()
        };
        let rank_pattern = obj_pairs("rank_pattern").into_iter().map(|(k, v)| (k, v as usize)).collect();
        let alpha_pattern = obj_pairs("alpha_pattern").into_iter().map(|(k, v)| (k, v as f32)).collect();
        let spec = AdapterSpec {
            r,
            alpha,
            dropout,
            use_rslora: m.get("use_rslora").and_then(|x| x.as_bool()).unwrap_or(false),
            init: Init::KaimingUniform,
            targets,
            exclude,
            layers_to_transform,
            layers_pattern,
            rank_pattern,
            alpha_pattern,
            base_model_name_or_path: s("base_model_name_or_path").map(String::from),
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// Python's repr of a float that came from JSON (integers stay integers
/// where PEFT would write them so; alpha 16 is written `16`).
fn py_num(v: f32) -> Value {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        json!(v as i64)
    } else {
        json!(f32_as_py(v))
    }
}

/// The shortest decimal that rounds to `v` (0.1f32 is written 0.1, not
/// 0.10000000149011612), as a float.
fn f32_as_py(v: f32) -> f64 {
    v.to_string().parse().unwrap_or(v as f64)
}

fn check_pattern(p: &str) -> Result<()> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{p})$")).map(|_| ()).map_err(|e| err!(InvalidArgument, "pattern '{p}': {e}"))
}

fn matches_targets(t: &Targets, path: &str) -> bool {
    match t {
        Targets::AllLinear => true,
        Targets::Regex(r) => Regex::new(&format!("^(?:{r})$")).is_ok_and(|re| re.is_match(path)),
        Targets::Names(n) => n.iter().any(|x| path == x || path.ends_with(&format!(".{x}"))),
    }
}

fn pattern_value<T: Copy>(pats: &[(String, T)], path: &str) -> Option<T> {
    pats.iter().find(|(p, _)| Regex::new(&format!(r"^(?:.*\.)?(?:{p})$")).is_ok_and(|re| re.is_match(path))).map(|(_, v)| *v)
}

/// Saves adapter `name` of `model` to directory `dir` in PEFT's format
/// (both files written atomically).
pub fn save_adapter(model: &Model, name: &str, dir: &Path) -> Result<()> {
    let ai = model.adapter_index(name)?;
    let info = &model.adapters[ai];
    std::fs::create_dir_all(dir).map_err(|e| err!(Io, "{}: cannot create: {e}", dir.display()))?;
    let mut tensors = Vec::with_capacity(info.modules.len() * 2);
    let mut paths = Vec::new();
    for &(l, j) in &info.modules {
        let layer = &model.blocks[l].lin[j];
        let ad = layer.adapter(name)?;
        let m = model.module(l, j);
        tensors.push((format!("base_model.model.{m}.lora_A.weight"), OutTensor::f32(vec![ad.r, layer.in_features()], &ad.a)));
        tensors.push((format!("base_model.model.{m}.lora_B.weight"), OutTensor::f32(vec![layer.out_features(), ad.r], &ad.b)));
        paths.push(m);
    }
    write_atomic(&dir.join("adapter_model.safetensors"), &tensors, &HashMap::new())?;
    let cfg = info.spec.to_config_json(&paths);
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| err!(Internal, "adapter_config.json: {e}"))?;
    crate::io::safetensors::write_file_atomic(&dir.join("adapter_config.json"), text.as_bytes())
}

/// Loads a PEFT adapter directory as adapter `name` of `model`. Every
/// tensor the config implies must be present with PEFT's shape, and every
/// tensor in the file must belong to a targeted module; nothing is added
/// to the model unless all of it loads.
pub fn load_adapter(model: &mut Model, dir: &Path, name: &str) -> Result<()> {
    let cpath = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cpath).map_err(|e| err!(Io, "{}: cannot read: {e}", cpath.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| err!(FileFormat, "{}: not JSON: {e}", cpath.display()))?;
    let spec = AdapterSpec::from_config_json(&v).map_err(|e| e.context(&cpath.display().to_string()))?;
    if v.get("target_modules").is_none_or(Value::is_null) && !model.cfg.arch.has_peft_default_targets() {
        bail!(Unsupported, "{}: no target_modules, and PEFT has no default for model_type `{}` (it refuses such a config too); list them", cpath.display(), model.cfg.arch.model_type());
    }
    let wpath = dir.join("adapter_model.safetensors");
    if !wpath.exists() && dir.join("adapter_model.bin").exists() {
        bail!(Unsupported, "{}: the adapter is in adapter_model.bin (a PyTorch pickle, PEFT's format before safetensors); only adapter_model.safetensors is read (save it again with safe_serialization=True)", dir.display());
    }
    let f = StFile::open(&wpath)?;
    // PEFT may save keys with the adapter name for non-default names in
    // some versions (`lora_A.<name>.weight`); accept the plain form only.
    let mut expected = std::collections::HashSet::new();
    let mut weights: Vec<(usize, usize, Vec<f32>, Vec<f32>)> = Vec::new();
    for l in 0..model.blocks.len() {
        for (j, leaf) in linears(&model.cfg).iter().enumerate() {
            let m = model.module(l, j);
            if !spec.targets(l, leaf, &m) {
                continue;
            }
            let layer = &model.blocks[l].lin[j];
            let r = spec.rank_for(&m);
            let (ka, kb) = (format!("base_model.model.{m}.lora_A.weight"), format!("base_model.model.{m}.lora_B.weight"));
            let read = |k: &str, shape: [usize; 2]| -> Result<Vec<f32>> {
                let t = f.get(k)?;
                if t.shape() != shape {
                    bail!(ShapeMismatch, "{}: '{k}' has shape {:?}, expected {shape:?}", wpath.display(), t.shape());
                }
                let dt = crate::dtype::DType::from_safetensors(t.dtype()).ok_or_else(|| err!(DtypeMismatch, "{}: '{k}' is {:?}", wpath.display(), t.dtype()))?;
                let b = t.data();
                Ok(match dt {
                    crate::dtype::DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
                    crate::dtype::DType::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
                    crate::dtype::DType::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
                })
            };
            let a = read(&ka, [r, layer.in_features()])?;
            let b = read(&kb, [layer.out_features(), r])?;
            expected.insert(ka);
            expected.insert(kb);
            weights.push((l, j, a, b));
        }
    }
    if weights.is_empty() {
        bail!(FileFormat, "{}: target modules {} match no module of this model", cpath.display(), spec.targets_display());
    }
    if let Some(extra) = f.names().into_iter().find(|n| !expected.contains(n)) {
        bail!(Unsupported, "{}: tensor '{extra}' is not a LoRA weight of a targeted module", wpath.display());
    }
    let mut spec = spec;
    let given: HashMap<(usize, usize), (Vec<f32>, Vec<f32>)> = weights.into_iter().map(|(l, j, a, b)| ((l, j), (a, b))).collect();
    // Add with zero init, then set the weights; on failure remove nothing
    // was partially added because set_adapter_weights only fails on shape,
    // which was checked above.
    spec.init = Init::KaimingUniform;
    model.add_adapter(name, spec)?;
    for ((l, j), (a, b)) in given {
        model.blocks[l].lin[j].set_adapter_weights(name, &a, &b)?;
    }
    model.touch_adapters();
    Ok(())
}
