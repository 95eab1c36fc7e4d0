//! The managed environment file: key validation, rendering and parsing.
//!
//! Both sides need these rules: the host validates keys before anything touches the guest, and
//! the agent renders and parses `/etc/profile.d/smolvm_env.sh`. Keeping them here, as pure
//! functions, means there is exactly one definition of the file format.

use std::collections::BTreeMap;

/// Where login shells pick the managed variables up.
pub const ENV_FILE: &str = "/etc/profile.d/smolvm_env.sh";

const HEADER: &str = "#!/bin/sh\n# SmolVM managed environment variables\n\n";
const EMPTY: &str = "# SmolVM environment variables (empty)\n";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("Environment variable key cannot be empty")]
    EmptyKey,
    #[error("Invalid environment variable key: '{0}'. Keys must match [A-Za-z_][A-Za-z0-9_]*")]
    InvalidKey(String),
    /// The value itself is never part of the message: it may be a secret.
    #[error("value of environment variable '{0}' contains a NUL byte, which an environment cannot hold")]
    NulInValue(String),
    #[error("line {0} of the environment file is not `export KEY=VALUE`")]
    Malformed(usize),
    /// (Sizes only: the value may be a secret.)
    #[error("environment variable '{0}' takes {1} bytes with its name; at most {MAX_VAR_BYTES} are allowed (the kernel hands no longer variable to a program it starts)")]
    TooLong(String, usize),
    #[error("the environment variables would take {0} bytes; at most {MAX_ENV_BYTES} are allowed, to leave room for the arguments of the commands they are given to")]
    TooMuch(usize),
}

/// The longest `KEY=value` the kernel hands to a program it starts (MAX_ARG_STRLEN, 32 pages,
/// with the NUL): every command of a shell that exports a longer one fails to start.
pub const MAX_VAR_BYTES: usize = 32 * 4096 - 1;

/// All of the managed variables together. A program's arguments and environment share 2 MiB
/// by default (a quarter of the 8 MiB stack limit); half is left for the rest.
pub const MAX_ENV_BYTES: usize = 1024 * 1024;

/// `KEY=value` and its NUL, as a program's environment holds it.
fn var_bytes(key: &str, value: &str) -> usize {
    key.len() + 1 + value.len() + 1
}

/// The whole set fits: checked on what a file will hold after a merge, too.
pub fn check_total(vars: &BTreeMap<String, String>) -> Result<(), EnvError> {
    let total: usize = vars.iter().map(|(k, v)| var_bytes(k, v)).sum();
    if total > MAX_ENV_BYTES {
        return Err(EnvError::TooMuch(total));
    }
    Ok(())
}

/// Keys must match `[A-Za-z_][A-Za-z0-9_]*`, the portable shell identifier.
pub fn validate_key(key: &str) -> Result<(), EnvError> {
    let mut chars = key.chars();
    let Some(first) = chars.next() else {
        return Err(EnvError::EmptyKey);
    };
    let ok_first = first.is_ascii_alphabetic() || first == '_';
    if !ok_first || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(EnvError::InvalidKey(shown_key(key)));
    }
    Ok(())
}

/// A bad key as an error shows it: cut at its first `=` (a `KEY=VALUE` passed where a key
/// goes, to `unset` say, must not put the value, maybe a secret, into the message), and with
/// control characters escaped (a message reaches a terminal). What does not look like a name
/// at all is not shown: a value given without its `KEY=` (a URL with `?a=b`, a token) would
/// otherwise be split at its own `=` and shown up to it.
fn shown_key(key: &str) -> String {
    let (name, cut) = match key.split_once('=') {
        Some((name, _)) => (name, true),
        None => (key, false),
    };
    let name_like = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' ') || c.is_control();
    if name.chars().count() > 64 || !name.chars().all(name_like) {
        return "…".into();
    }
    let mut shown: String = name.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect();
    if cut {
        shown.push_str("=…");
    }
    shown
}

/// Validate a whole batch before any of it is used, so that one bad entry rejects all.
pub fn validate_vars(vars: &BTreeMap<String, String>) -> Result<(), EnvError> {
    for (k, v) in vars {
        validate_key(k)?;
        if v.contains('\0') {
            return Err(EnvError::NulInValue(k.clone()));
        }
        // (Without its NUL, as MAX_VAR_BYTES counts.)
        let bytes = var_bytes(k, v) - 1;
        if bytes > MAX_VAR_BYTES {
            return Err(EnvError::TooLong(k.clone(), bytes));
        }
    }
    check_total(vars)
}

/// Quote for POSIX sh: always single quotes, an embedded `'` becomes `'"'"'` (as Python's
/// `shlex.quote` does). Inside single quotes the shell interprets nothing, so `$`, backticks,
/// backslashes and newlines stay literal and nothing in a value can run.
pub fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push_str("'\"'\"'");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Render the file: header, then `export KEY='value'` lines sorted by key.
pub fn render(vars: &BTreeMap<String, String>) -> String {
    if vars.is_empty() {
        return EMPTY.to_string();
    }
    let mut out = String::from(HEADER);
    for (k, v) in vars {
        out.push_str("export ");
        out.push_str(k);
        out.push('=');
        out.push_str(&quote(v));
        out.push('\n');
    }
    out
}

/// Parse a file written by [`render`] (and hand edits that stay within `export KEY=WORD` with
/// POSIX quoting). Comments and blank lines are skipped.
pub fn parse(text: &str) -> Result<BTreeMap<String, String>, EnvError> {
    let mut vars = BTreeMap::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    let mut line = 1;
    while i < chars.len() {
        // Skip blank space and comment lines.
        match chars[i] {
            '\n' => {
                line += 1;
                i += 1;
                continue;
            }
            ' ' | '\t' => {
                i += 1;
                continue;
            }
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            _ => {}
        }
        let start_line = line;
        let rest: String = chars[i..chars.len().min(i + 7)].iter().collect();
        if rest != "export " && rest != "export\t" {
            return Err(EnvError::Malformed(start_line));
        }
        i += 7;
        while i < chars.len() && matches!(chars[i], ' ' | '\t') {
            i += 1;
        }
        let key_start = i;
        while i < chars.len() && chars[i] != '=' && chars[i] != '\n' {
            i += 1;
        }
        if i >= chars.len() || chars[i] != '=' {
            return Err(EnvError::Malformed(start_line));
        }
        let key: String = chars[key_start..i].iter().collect();
        validate_key(&key).map_err(|_| EnvError::Malformed(start_line))?;
        i += 1;
        let mut value = String::new();
        // One shell word: concatenated quoted and unquoted pieces up to an unquoted newline.
        while i < chars.len() && chars[i] != '\n' {
            match chars[i] {
                '\'' => {
                    i += 1;
                    while i < chars.len() && chars[i] != '\'' {
                        if chars[i] == '\n' {
                            line += 1;
                        }
                        value.push(chars[i]);
                        i += 1;
                    }
                    if i >= chars.len() {
                        return Err(EnvError::Malformed(start_line));
                    }
                    i += 1;
                }
                '"' => {
                    i += 1;
                    while i < chars.len() && chars[i] != '"' {
                        let c = chars[i];
                        if c == '\\' && i + 1 < chars.len() && matches!(chars[i + 1], '"' | '\\' | '$' | '`') {
                            value.push(chars[i + 1]);
                            i += 2;
                            continue;
                        }
                        if c == '$' || c == '`' {
                            // Expansions would need a shell; refuse rather than guess.
                            return Err(EnvError::Malformed(start_line));
                        }
                        if c == '\n' {
                            line += 1;
                        }
                        value.push(c);
                        i += 1;
                    }
                    if i >= chars.len() {
                        return Err(EnvError::Malformed(start_line));
                    }
                    i += 1;
                }
                '\\' if i + 1 < chars.len() => {
                    if chars[i + 1] != '\n' {
                        value.push(chars[i + 1]);
                    } else {
                        line += 1;
                    }
                    i += 2;
                }
                ' ' | '\t' => {
                    // Blanks end the word; a comment may follow them, anything else is not ours.
                    while i < chars.len() && matches!(chars[i], ' ' | '\t') {
                        i += 1;
                    }
                    if i < chars.len() && chars[i] == '#' {
                        while i < chars.len() && chars[i] != '\n' {
                            i += 1;
                        }
                    }
                    if i < chars.len() && chars[i] != '\n' {
                        return Err(EnvError::Malformed(start_line));
                    }
                }
                '$' | '`' | ';' | '&' | '|' | '<' | '>' | '(' | ')' => {
                    return Err(EnvError::Malformed(start_line));
                }
                c => {
                    value.push(c);
                    i += 1;
                }
            }
        }
        vars.insert(key, value);
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn keys_follow_the_documented_pattern() {
        for ok in ["MY_VAR", "_PRIVATE", "VAR_123", "a", "_"] {
            assert_eq!(validate_key(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_key("").unwrap_err().to_string(), "Environment variable key cannot be empty");
        assert_eq!(
            validate_key("MY-VAR").unwrap_err().to_string(),
            "Invalid environment variable key: 'MY-VAR'. Keys must match [A-Za-z_][A-Za-z0-9_]*"
        );
        for bad in ["123VAR", "A B", "é", "A=B", "A\n"] {
            assert!(matches!(validate_key(bad), Err(EnvError::InvalidKey(_))), "{bad:?}");
        }
    }

    #[test]
    fn variables_fit_what_the_kernel_hands_a_program() {
        // `K=` and the value: 131071 bytes is the most a variable can be.
        let most = "s".repeat(MAX_VAR_BYTES - 2);
        assert_eq!(validate_vars(&map(&[("K", &most)])), Ok(()));
        let over = format!("{most}s");
        let err = validate_vars(&map(&[("K", &over)])).unwrap_err().to_string();
        assert_eq!(
            err,
            "environment variable 'K' takes 131072 bytes with its name; at most 131071 are allowed (the kernel hands no longer variable to a program it starts)"
        );
        // Nine of 120 KB each pass one by one, not together.
        let big = "v".repeat(120 * 1024);
        let nine: BTreeMap<String, String> = (0..9).map(|i| (format!("V{i}"), big.clone())).collect();
        assert!(nine.iter().all(|(k, v)| validate_vars(&map(&[(k, v)])).is_ok()));
        let err = validate_vars(&nine).unwrap_err().to_string();
        assert_eq!(
            err,
            "the environment variables would take 1105956 bytes; at most 1048576 are allowed, to leave room for the arguments of the commands they are given to"
        );
        assert!(!err.contains("vvv"));
    }

    #[test]
    fn a_bad_key_anywhere_rejects_the_batch() {
        let vars = map(&[("GOOD", "1"), ("BAD-KEY", "2")]);
        assert!(validate_vars(&vars).is_err());
        let err = validate_vars(&map(&[("K", "se\0cret")])).unwrap_err().to_string();
        assert!(!err.contains("secret") && err.contains("'K'"), "{err}");
    }

    #[test]
    fn renders_the_documented_format() {
        let vars = map(&[("DATABASE_URL", "postgres://localhost:5432/mydb"), ("APP_MODE", "production")]);
        assert_eq!(
            render(&vars),
            "#!/bin/sh\n# SmolVM managed environment variables\n\n\
             export APP_MODE='production'\n\
             export DATABASE_URL='postgres://localhost:5432/mydb'\n"
        );
        assert_eq!(render(&BTreeMap::new()), "# SmolVM environment variables (empty)\n");
        assert_eq!(quote("it's"), "'it'\"'\"'s'");
    }

    #[test]
    fn hard_values_round_trip() {
        let long = "x'$\n".repeat(16 * 1024);
        let vars = map(&[
            ("QUOTES", "value with 'quotes' and \"double\" ones"),
            ("DOLLAR", "$HOME ${PATH} $(touch /tmp/x) `id`"),
            ("BACKSLASH", "a\\b\\\\c\\n"),
            ("NEWLINES", "line1\nline2\n\nend\n"),
            ("TABS", "\tx\t"),
            ("UNICODE", "héllo wörld ✓ 日本"),
            ("EMPTY", ""),
            ("ONLY_QUOTE", "'"),
            ("LONG", long.as_str()),
        ]);
        assert_eq!(parse(&render(&vars)).unwrap(), vars);
        assert_eq!(parse(&render(&BTreeMap::new())).unwrap(), BTreeMap::new());
    }

    #[test]
    fn parses_plain_posix_words_and_refuses_expansions() {
        let text = "export A=plain\nexport B=\"dq \\\"x\\\"\"\nexport C=a\\ b\n";
        assert_eq!(parse(text).unwrap(), map(&[("A", "plain"), ("B", "dq \"x\""), ("C", "a b")]));
        assert_eq!(parse("export A=$HOME\n"), Err(EnvError::Malformed(1)));
        assert_eq!(parse("\nexport A='x\n"), Err(EnvError::Malformed(2)));
        assert_eq!(parse("A=1\n"), Err(EnvError::Malformed(1)));
        assert_eq!(parse("export 1A=1\n"), Err(EnvError::Malformed(1)));
    }

    #[test]
    fn hand_edits_with_extra_blanks_and_comments_are_read() {
        let text = "#!/bin/sh\n  # mine\nexport   A='x y'   # why A\nexport\tB=2\n\texport C=3 #\n";
        assert_eq!(parse(text).unwrap(), map(&[("A", "x y"), ("B", "2"), ("C", "3")]));
        // A comment needs a blank before it, as in sh: `#` inside a word is the word's.
        assert_eq!(parse("export A=x#y\n").unwrap(), map(&[("A", "x#y")]));
        assert_eq!(parse("export A=1 B=2\n"), Err(EnvError::Malformed(1)));
        assert_eq!(parse("exportA=1\n"), Err(EnvError::Malformed(1)));
    }

    #[test]
    fn a_bad_key_is_shown_without_what_follows_its_equals_sign_and_with_control_characters_escaped() {
        let e = validate_key("API_KEY=sk-live-SECRET").unwrap_err().to_string();
        assert!(!e.contains("SECRET"), "{e}");
        assert!(e.starts_with("Invalid environment variable key: 'API_KEY=…'"), "{e}");
        let e = validate_key("A\u{1b}X").unwrap_err().to_string();
        assert!(!e.contains('\u{1b}'), "{e}");
        assert!(e.contains("A\\u{1b}X"), "{e}");
        // A value given without its `KEY=`: nothing of it is shown.
        for value in ["postgres://app:SECRET@db/x?sslmode=require", "sk-live-SECRET+/xyz==", &"SECRET-".repeat(20)] {
            let e = validate_key(value).unwrap_err().to_string();
            assert_eq!(e, "Invalid environment variable key: '…'. Keys must match [A-Za-z_][A-Za-z0-9_]*", "{value}");
        }
        assert!(validate_key("MY-VAR").unwrap_err().to_string().contains("'MY-VAR'"));
    }
}
