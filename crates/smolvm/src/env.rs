//! Environment variables: the rules shared with the agent, plus host-side input parsing.

pub use smolvm_proto::env::*;

use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// `KEY=VALUE` from a command line. The value may itself contain `=`. Errors never echo the
/// input: a mistyped pair may be a secret.
pub fn parse_pair(pair: &str) -> Result<(String, String)> {
    let Some((key, value)) = pair.split_once('=') else {
        return Err(Error::validation("env", "malformed pair (expected KEY=VALUE)"));
    };
    if key.is_empty() {
        return Err(Error::validation("env", "empty key in pair"));
    }
    validate_key(key)?;
    Ok((key.to_string(), value.to_string()))
}

pub fn parse_pairs<S: AsRef<str>>(pairs: &[S]) -> Result<BTreeMap<String, String>> {
    pairs.iter().map(|p| parse_pair(p.as_ref())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs() {
        assert_eq!(parse_pair("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(parse_pair("A=").unwrap(), ("A".into(), "".into()));
        assert_eq!(parse_pair("secretvalue").unwrap_err().to_string(), "invalid env: malformed pair (expected KEY=VALUE)");
        assert_eq!(parse_pair("=v").unwrap_err().to_string(), "invalid env: empty key in pair");
        assert!(parse_pair("MY-VAR=1").unwrap_err().to_string().starts_with("Invalid environment variable key: 'MY-VAR'"));
        assert_eq!(parse_pairs(&["B=2", "A=1"]).unwrap().keys().collect::<Vec<_>>(), ["A", "B"]);
    }
}
