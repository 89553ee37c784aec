//! `--config kiln.toml`: every `kiln serve` flag can live in a TOML file, keyed by the flag's
//! name (`max_num_seqs = 32` or `max-num-seqs = 32`). Precedence is flag > `KILN_*` env var >
//! file > default: the file's values are turned into the `KILN_*` variables clap already reads,
//! but only where the environment does not set them. Runs once in `main`, before any thread
//! starts; nothing deeper in the code reads the environment.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Finds `--config PATH` / `--config=PATH` in the raw arguments, else `KILN_CONFIG`.
pub fn config_path(args: &[String]) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().cloned();
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(p.to_string());
        }
    }
    std::env::var("KILN_CONFIG").ok()
}

/// Reads the file and exports its values as `KILN_*` env vars. `known_envs` are the env names
/// clap accepts; any other key is an error naming it (a typo must not be silently ignored).
pub fn apply_file(path: &Path, known_envs: &[String]) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    let table: BTreeMap<String, toml::Value> =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    for (key, value) in table {
        let env = format!("KILN_{}", key.to_uppercase().replace('-', "_"));
        if !known_envs.contains(&env) {
            let mut keys: Vec<String> =
                known_envs.iter().map(|e| e.trim_start_matches("KILN_").to_lowercase()).collect();
            keys.sort();
            bail!("{}: unknown setting '{key}'; known settings: {}", path.display(), keys.join(", "));
        }
        if std::env::var_os(&env).is_none() {
            std::env::set_var(&env, to_env_value(&key, &value)?);
        }
    }
    Ok(())
}

fn to_env_value(key: &str, v: &toml::Value) -> Result<String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Array(items) => items.iter().map(|i| to_env_value(key, i)).collect::<Result<Vec<_>>>()?.join(","),
        // `[default_sampling]` with `top_k = 40` ... -> "top_k=40,...".
        toml::Value::Table(t) => {
            t.iter().map(|(k, v)| Ok(format!("{k}={}", to_env_value(key, v)?))).collect::<Result<Vec<_>>>()?.join(",")
        }
        other => bail!("setting '{key}': unsupported value {other}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_config_flag_in_both_spellings() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(config_path(&args(&["kiln", "serve", "--config", "a.toml"])), Some("a.toml".into()));
        assert_eq!(config_path(&args(&["kiln", "serve", "--config=b.toml"])), Some("b.toml".into()));
    }

    #[test]
    fn unknown_keys_are_errors_and_env_wins() {
        let dir = std::env::temp_dir().join(format!("kiln-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("kiln.toml");
        std::fs::write(&f, "max-num-seqs = 7\nport = 9000\napi_key = [\"a\", \"b\"]\n").unwrap();
        let known: Vec<String> =
            ["KILN_MAX_NUM_SEQS", "KILN_PORT", "KILN_API_KEY"].iter().map(|s| s.to_string()).collect();
        std::env::set_var("KILN_PORT", "1234");
        apply_file(&f, &known).unwrap();
        assert_eq!(std::env::var("KILN_MAX_NUM_SEQS").unwrap(), "7");
        assert_eq!(std::env::var("KILN_PORT").unwrap(), "1234");
        assert_eq!(std::env::var("KILN_API_KEY").unwrap(), "a,b");
        std::env::remove_var("KILN_DEFAULT_SAMPLING");
        std::fs::write(&f, "[default_sampling]\nmin_p = 0.05\ntop_k = 40\n").unwrap();
        apply_file(&f, &["KILN_DEFAULT_SAMPLING".to_string()]).unwrap();
        assert_eq!(std::env::var("KILN_DEFAULT_SAMPLING").unwrap(), "min_p=0.05,top_k=40");
        std::fs::write(&f, "max_num_seq = 7\n").unwrap();
        let e = apply_file(&f, &known).unwrap_err().to_string();
        assert!(e.contains("unknown setting 'max_num_seq'"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
