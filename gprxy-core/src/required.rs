//! Required claims: constraints a validated token's claims must meet, beyond issuer, audience
//! and scopes. An issuer that serves many tenants (GitHub Actions serves every repository in the
//! world, Google every account) needs them: `repository_owner = acme`, `email_verified = true`.
//!
//! A constraint names a claim (exact name or dotted path, as [`ClaimPath`]) and what it must be:
//! equal to one string, one of several strings, or JSON `true`. Strings compare exactly (case
//! and whitespace included); a missing claim, a claim of another JSON type (a number, an array,
//! the string `"true"` where `true` is required) never meets one.
//!
//! The text form (`gprxy.required_claims`) is a comma-separated list:
//!
//! ```text
//! repository_owner = acme, email_verified = true, environment in (prod | staging), x = "a, b"
//! ```
//!
//! A bare `true` requires the boolean; quote it (`"true"`) to require the string. Values with
//! spaces, commas, parentheses, `|`, `=` or quotes are written in double quotes (`\"` and `\\`
//! escape inside).

use std::fmt;

use serde_json::{Map, Value};

use crate::claims::ClaimPath;
use crate::error::{Quoted, ValidationError};

/// What a required claim must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constraint {
    /// A string equal to this one.
    Equals(String),
    /// A string equal to one of these.
    OneOf(Vec<String>),
    /// The JSON boolean `true`.
    IsTrue,
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Equals(v) => write!(f, "must equal {}", Quoted::new(v)),
            Self::OneOf(vs) => {
                f.write_str("must be one of ")?;
                for (i, v) in vs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{}", Quoted::new(v))?;
                }
                Ok(())
            }
            Self::IsTrue => f.write_str("must be true"),
        }
    }
}

/// One claim and its constraint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequiredClaim {
    claim: ClaimPath,
    constraint: Constraint,
}

impl RequiredClaim {
    /// `claim` must meet `constraint`. Refuses an empty claim name, an empty list, or an
    /// empty string to compare with.
    pub fn new(claim: &str, constraint: Constraint) -> Result<Self, String> {
        let claim = ClaimPath::parse(claim).map_err(str::to_owned)?;
        match &constraint {
            Constraint::Equals(v) if v.is_empty() => {
                return Err(format!("claim {:?}: the required value is empty", claim.as_str()))
            }
            Constraint::OneOf(vs) if vs.is_empty() => {
                return Err(format!("claim {:?}: the list of allowed values is empty", claim.as_str()))
            }
            Constraint::OneOf(vs) if vs.iter().any(String::is_empty) => {
                return Err(format!("claim {:?}: an allowed value is empty", claim.as_str()))
            }
            _ => {}
        }
        Ok(Self { claim, constraint })
    }

    /// The claim's name or path.
    pub fn claim(&self) -> &str {
        self.claim.as_str()
    }

    /// The constraint.
    pub fn constraint(&self) -> &Constraint {
        &self.constraint
    }

    /// Checks the claims; the error names the claim, the constraint and what the token has.
    pub fn check(&self, claims: &Map<String, Value>) -> Result<(), ValidationError> {
        let found = self.claim.lookup(claims);
        let ok = match (&self.constraint, found) {
            (Constraint::Equals(want), Some(Value::String(got))) => got == want,
            (Constraint::OneOf(allowed), Some(Value::String(got))) => allowed.iter().any(|a| a == got),
            (Constraint::IsTrue, Some(Value::Bool(true))) => true,
            _ => false,
        };
        if ok {
            return Ok(());
        }
        Err(ValidationError::RequiredClaim {
            claim: Quoted::new(self.claim.as_str()),
            constraint: self.constraint.to_string(),
            found: describe(found),
        })
    }
}

/// What the token has, for a refusal: a string shown (shortened, escaped), other types named.
fn describe(v: Option<&Value>) -> String {
    match v {
        None => "missing".into(),
        Some(Value::String(s)) => Quoted::new(s).to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Null) => "null".into(),
        Some(Value::Number(_)) => "a number".into(),
        Some(Value::Array(_)) => "an array".into(),
        Some(Value::Object(_)) => "an object".into(),
    }
}

impl fmt::Display for RequiredClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.claim.as_str(), self.constraint)
    }
}

/// Every required claim of a policy, checked in order; the first unmet one refuses the token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequiredClaims(Vec<RequiredClaim>);

/// Constraints written as a TOML table (`claim = "value"`, `claim = ["a", "b"]`, `claim =
/// true`), as gprxy.toml and the issuers file write them. An error names the claim and what is
/// wrong with it.
pub fn from_toml_table(
    table: std::collections::BTreeMap<String, toml::Value>,
) -> Result<Vec<RequiredClaim>, (String, String)> {
    table
        .into_iter()
        .map(|(claim, value)| {
            let bad = |reason: &str| (claim.clone(), reason.to_owned());
            let constraint = match value {
                toml::Value::String(v) => Constraint::Equals(v),
                toml::Value::Boolean(true) => Constraint::IsTrue,
                toml::Value::Boolean(false) => {
                    return Err(bad("only true can be required of a boolean (write \"false\" for the string)"))
                }
                toml::Value::Array(items) => Constraint::OneOf(
                    items
                        .into_iter()
                        .map(|v| match v {
                            toml::Value::String(s) => Ok(s),
                            _ => Err(bad("a list holds strings only")),
                        })
                        .collect::<Result<_, _>>()?,
                ),
                toml::Value::Table(_) => return Err(bad(
                    "must be a string, a list of strings, or true (a dotted claim name is quoted: \"a.b\" = \"value\")",
                )),
                _ => return Err(bad("must be a string, a list of strings, or true")),
            };
            RequiredClaim::new(&claim, constraint).map_err(|e| (claim.clone(), e))
        })
        .collect()
}

impl RequiredClaims {
    /// From constraints; a claim named twice is refused (which one would win is unclear).
    pub fn new(list: Vec<RequiredClaim>) -> Result<Self, String> {
        for (i, r) in list.iter().enumerate() {
            if list[..i].iter().any(|p| p.claim() == r.claim()) {
                return Err(format!("claim {:?} is required twice", r.claim()));
            }
        }
        Ok(Self(list))
    }

    /// Parses the text form (see the module documentation). Empty text: no constraint.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut p = Parser { s: text, i: 0 };
        let mut list = Vec::new();
        p.skip_ws();
        if p.at_end() {
            return Ok(Self::default());
        }
        loop {
            list.push(p.item()?);
            p.skip_ws();
            if p.at_end() {
                break;
            }
            p.expect(',')?;
        }
        Self::new(list)
    }

    /// No constraint at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The constraints.
    pub fn iter(&self) -> impl Iterator<Item = &RequiredClaim> {
        self.0.iter()
    }

    /// Checks every constraint.
    pub fn check(&self, claims: &Map<String, Value>) -> Result<(), ValidationError> {
        self.0.iter().try_for_each(|r| r.check(claims))
    }
}

struct Parser<'a> {
    s: &'a str,
    i: usize,
}

/// Characters that end a bare word.
fn special(c: char) -> bool {
    c.is_whitespace() || matches!(c, ',' | '(' | ')' | '|' | '=' | '"')
}

impl<'a> Parser<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.i..]
    }

    fn at_end(&self) -> bool {
        self.i >= self.s.len()
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn skip_ws(&mut self) {
        let rest = self.rest();
        self.i += rest.len() - rest.trim_start().len();
    }

    fn near(&self) -> String {
        match self.peek() {
            None => "at the end".into(),
            Some(_) => format!("at {:?}", self.rest().chars().take(20).collect::<String>()),
        }
    }

    fn expect(&mut self, c: char) -> Result<(), String> {
        self.skip_ws();
        if self.peek() == Some(c) {
            self.i += c.len_utf8();
            Ok(())
        } else {
            Err(format!("expected {c:?} {}", self.near()))
        }
    }

    fn bare(&mut self) -> &'a str {
        let rest = self.rest();
        let end = rest.find(special).unwrap_or(rest.len());
        self.i += end;
        &rest[..end]
    }

    /// A value: `(quoted, text)`.
    fn value(&mut self) -> Result<(bool, String), String> {
        self.skip_ws();
        if self.peek() != Some('"') {
            let w = self.bare();
            if w.is_empty() {
                return Err(format!("expected a value {}", self.near()));
            }
            return Ok((false, w.to_owned()));
        }
        self.i += 1;
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((at, c)) = chars.next() {
            match c {
                '"' => {
                    self.i += at + 1;
                    return Ok((true, out));
                }
                '\\' => match chars.next() {
                    Some((_, e @ ('"' | '\\'))) => out.push(e),
                    _ => return Err("in a quoted value only \\\" and \\\\ are escapes".into()),
                },
                c => out.push(c),
            }
        }
        Err("a quoted value has no closing \"".into())
    }

    fn item(&mut self) -> Result<RequiredClaim, String> {
        self.skip_ws();
        let claim = self.bare().to_owned();
        if claim.is_empty() {
            return Err(format!("expected a claim name {}", self.near()));
        }
        self.skip_ws();
        let constraint = if self.peek() == Some('=') {
            self.i += 1;
            match self.value()? {
                (false, v) if v == "true" => Constraint::IsTrue,
                (false, v) if v == "false" => {
                    return Err(format!(
                        "claim {claim:?}: only true can be required of a boolean (write \"false\" for the string)"
                    ))
                }
                (_, v) => Constraint::Equals(v),
            }
        } else {
            let word = self.bare();
            if !word.eq_ignore_ascii_case("in") {
                return Err(format!("claim {claim:?}: expected = or in (...) {}", self.near()));
            }
            self.expect('(')?;
            let mut values = Vec::new();
            loop {
                match self.value()? {
                    (false, v) if v == "true" || v == "false" => {
                        return Err(format!(
                            "claim {claim:?}: a list holds strings; write \"{v}\" in quotes for the string"
                        ))
                    }
                    (_, v) => values.push(v),
                }
                self.skip_ws();
                match self.peek() {
                    Some('|' | ',') => self.i += 1,
                    Some(')') => {
                        self.i += 1;
                        break;
                    }
                    _ => return Err(format!("claim {claim:?}: expected | or ) {}", self.near())),
                }
            }
            Constraint::OneOf(values)
        };
        RequiredClaim::new(&claim, constraint)
    }
}

impl fmt::Display for RequiredClaims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    fn refusal(r: &RequiredClaims, c: Value) -> String {
        let e = r.check(&claims(c)).unwrap_err();
        assert_eq!(e.code(), "required_claim");
        e.to_string()
    }

    #[test]
    fn parses_each_kind() {
        let r = RequiredClaims::parse(
            " repository_owner=acme, email_verified = true ,environment in (prod|staging), \
             https://gprxy.io/tier IN ( \"gold plan\" , silver ), s = \"true\", q = \"a, \\\"b\\\"\"",
        )
        .unwrap();
        let got: Vec<(&str, &Constraint)> = r.iter().map(|c| (c.claim(), c.constraint())).collect();
        assert_eq!(
            got,
            vec![
                ("repository_owner", &Constraint::Equals("acme".into())),
                ("email_verified", &Constraint::IsTrue),
                ("environment", &Constraint::OneOf(vec!["prod".into(), "staging".into()])),
                ("https://gprxy.io/tier", &Constraint::OneOf(vec!["gold plan".into(), "silver".into()])),
                ("s", &Constraint::Equals("true".into())),
                ("q", &Constraint::Equals("a, \"b\"".into())),
            ]
        );
        assert!(RequiredClaims::parse("").unwrap().is_empty());
        assert!(RequiredClaims::parse("  \n ").unwrap().is_empty());
        assert_eq!(
            RequiredClaims::parse("a=x, b in (y|z), c=true").unwrap().to_string(),
            "a must equal \"x\", b must be one of \"y\", \"z\", c must be true"
        );
    }

    #[test]
    fn bad_text_refused_with_the_reason() {
        let err = |t: &str| RequiredClaims::parse(t).unwrap_err();
        assert_eq!(err("a"), "claim \"a\": expected = or in (...) at the end");
        assert_eq!(err("a = "), "expected a value at the end");
        assert_eq!(err("a = x b = y"), "expected ',' at \"b = y\"");
        assert_eq!(err("a = x,"), "expected a claim name at the end");
        assert_eq!(err("= x"), "expected a claim name at \"= x\"");
        assert_eq!(err("a in prod"), "expected '(' at \"prod\"");
        assert_eq!(err("a in ()"), "expected a value at \")\"");
        assert_eq!(err("a in (x"), "claim \"a\": expected | or ) at the end");
        assert_eq!(
            err("a in (x|true)"),
            "claim \"a\": a list holds strings; write \"true\" in quotes for the string"
        );
        assert_eq!(
            err("a = false"),
            "claim \"a\": only true can be required of a boolean (write \"false\" for the string)"
        );
        assert_eq!(err("a = \"x"), "a quoted value has no closing \"");
        assert_eq!(err("a = \"\\n\""), "in a quoted value only \\\" and \\\\ are escapes");
        assert_eq!(err("a = \"\""), "claim \"a\": the required value is empty");
        assert_eq!(err("a in (x|\"\")"), "claim \"a\": an allowed value is empty");
        assert_eq!(err("a = x, a = y"), "claim \"a\" is required twice");
    }

    #[test]
    fn equals_compares_strings_exactly() {
        let r = RequiredClaims::parse("repository_owner = acme").unwrap();
        assert!(r.check(&claims(json!({"repository_owner": "acme"}))).is_ok());
        assert_eq!(
            refusal(&r, json!({"repository_owner": "evil"})),
            "required claim \"repository_owner\" must equal \"acme\" (token: \"evil\")"
        );
        assert_eq!(
            refusal(&r, json!({"repository_owner": "ACME"})),
            "required claim \"repository_owner\" must equal \"acme\" (token: \"ACME\")"
        );
        assert_eq!(
            refusal(&r, json!({"repository_owner": "acme "})),
            "required claim \"repository_owner\" must equal \"acme\" (token: \"acme \")"
        );
        assert_eq!(
            refusal(&r, json!({"repository_owner": ["acme"]})),
            "required claim \"repository_owner\" must equal \"acme\" (token: an array)"
        );
        assert_eq!(
            refusal(&r, json!({"sub": "acme"})),
            "required claim \"repository_owner\" must equal \"acme\" (token: missing)"
        );
        let n = RequiredClaims::parse("id = 42").unwrap();
        assert_eq!(
            refusal(&n, json!({"id": 42})),
            "required claim \"id\" must equal \"42\" (token: a number)"
        );
    }

    #[test]
    fn one_of_needs_a_listed_string() {
        let r = RequiredClaims::parse("environment in (prod|staging)").unwrap();
        assert!(r.check(&claims(json!({"environment": "prod"}))).is_ok());
        assert!(r.check(&claims(json!({"environment": "staging"}))).is_ok());
        assert_eq!(
            refusal(&r, json!({"environment": "dev"})),
            "required claim \"environment\" must be one of \"prod\", \"staging\" (token: \"dev\")"
        );
        assert_eq!(
            refusal(&r, json!({})),
            "required claim \"environment\" must be one of \"prod\", \"staging\" (token: missing)"
        );
        assert_eq!(
            refusal(&r, json!({"environment": null})),
            "required claim \"environment\" must be one of \"prod\", \"staging\" (token: null)"
        );
    }

    #[test]
    fn true_means_the_json_boolean() {
        let r = RequiredClaims::parse("email_verified = true").unwrap();
        assert!(r.check(&claims(json!({"email_verified": true}))).is_ok());
        assert_eq!(
            refusal(&r, json!({"email_verified": "true"})),
            "required claim \"email_verified\" must be true (token: \"true\")"
        );
        assert_eq!(
            refusal(&r, json!({"email_verified": false})),
            "required claim \"email_verified\" must be true (token: false)"
        );
        assert_eq!(
            refusal(&r, json!({"email_verified": 1})),
            "required claim \"email_verified\" must be true (token: a number)"
        );
        assert_eq!(refusal(&r, json!({})), "required claim \"email_verified\" must be true (token: missing)");
    }

    #[test]
    fn dotted_paths_and_first_unmet_constraint_named() {
        let r = RequiredClaims::parse("kubernetes.io.namespace = ci, repository_owner = acme").unwrap();
        assert!(r
            .check(&claims(json!({"kubernetes.io": {"namespace": "ci"}, "repository_owner": "acme"})))
            .is_ok());
        assert_eq!(
            refusal(&r, json!({"kubernetes.io": {"namespace": "default"}, "repository_owner": "evil"})),
            "required claim \"kubernetes.io.namespace\" must equal \"ci\" (token: \"default\")"
        );
        // A token value with control characters is escaped in the refusal.
        assert_eq!(
            refusal(&r, json!({"kubernetes.io": {"namespace": "ci\n x"}})),
            "required claim \"kubernetes.io.namespace\" must equal \"ci\" (token: \"ci\\n x\")"
        );
    }

    #[test]
    fn built_from_typed_values() {
        let r = RequiredClaims::new(vec![
            RequiredClaim::new("repository_owner", Constraint::Equals("acme".into())).unwrap(),
            RequiredClaim::new("email_verified", Constraint::IsTrue).unwrap(),
        ])
        .unwrap();
        assert_eq!(r, RequiredClaims::parse("repository_owner = acme, email_verified = true").unwrap());
        assert_eq!(
            RequiredClaim::new("env", Constraint::OneOf(vec![])).unwrap_err(),
            "claim \"env\": the list of allowed values is empty"
        );
        assert_eq!(RequiredClaim::new(" ", Constraint::IsTrue).unwrap_err(), "claim name must not be empty");
    }
}
