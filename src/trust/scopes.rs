//! SMART scopes, v1 and v2, parsed into what they grant.
//!
//! Owns: the scope grammar `(patient|user|system)/(Type|*).(read|write|*|[c][r][u][d][s])[?k=v&..]`
//! and the union of what a token's scopes grant on a resource type. A scope that does not parse,
//! or whose constraints the gateway cannot evaluate, grants nothing. Must not know DICOM.

use std::fmt;

/// The context level a scope applies in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    Patient,
    User,
    System,
}

/// The SMART v2 interactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms {
    pub create: bool,
    pub read: bool,
    pub update: bool,
    pub delete: bool,
    pub search: bool,
}

impl Perms {
    fn union(self, o: Perms) -> Perms {
        Perms {
            create: self.create || o.create,
            read: self.read || o.read,
            update: self.update || o.update,
            delete: self.delete || o.delete,
            search: self.search || o.search,
        }
    }
    pub fn is_empty(&self) -> bool {
        !(self.create || self.read || self.update || self.delete || self.search)
    }
}

impl fmt::Display for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (on, c) in [
            (self.create, 'c'),
            (self.read, 'r'),
            (self.update, 'u'),
            (self.delete, 'd'),
            (self.search, 's'),
        ] {
            if on {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// One parsed resource scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub level: Level,
    /// The resource type, or `*`.
    pub resource: String,
    pub perms: Perms,
    /// `?name=value` constraints in order; the gateway evaluates none of them yet, so a
    /// constrained scope grants nothing.
    pub constraints: Vec<(String, String)>,
}

/// All of a token's scopes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeSet {
    pub scopes: Vec<Scope>,
    /// Scope strings that are not resource scopes (`openid`, `launch/patient`, malformed ones...).
    pub other: Vec<String>,
}

impl ScopeSet {
    /// Parses a space-separated scope string (RFC 6749 `scope`).
    pub fn parse(s: &str) -> ScopeSet {
        let mut set = ScopeSet::default();
        for item in s.split([' ', '\t', '\n', '\r']).filter(|x| !x.is_empty()) {
            match parse_scope(item) {
                Some(sc) => set.scopes.push(sc),
                None => set.other.push(item.to_string()),
            }
        }
        set
    }

    /// What the unconstrained scopes at `level` grant on `resource` (a wildcard type counts).
    pub fn granted(&self, level: Level, resource: &str) -> Perms {
        self.scopes
            .iter()
            .filter(|s| s.level == level && (s.resource == resource || s.resource == "*"))
            .filter(|s| s.constraints.is_empty())
            .fold(Perms::default(), |acc, s| acc.union(s.perms))
    }

    /// Levels at which any scope names `resource` (or `*`), constrained or not.
    pub fn levels_naming(&self, resource: &str) -> Vec<Level> {
        let mut v = Vec::new();
        for s in &self.scopes {
            if (s.resource == resource || s.resource == "*") && !v.contains(&s.level) {
                v.push(s.level);
            }
        }
        v
    }
}

fn parse_scope(item: &str) -> Option<Scope> {
    let (level, rest) = item.split_once('/')?;
    let level = match level {
        "patient" => Level::Patient,
        "user" => Level::User,
        "system" => Level::System,
        _ => return None,
    };
    let (body, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (resource, action) = body.split_once('.')?;
    let resource_ok = resource == "*"
        || (resource
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_uppercase())
            && resource.chars().all(|c| c.is_ascii_alphanumeric()));
    if !resource_ok {
        return None;
    }
    let perms = match action {
        // v1
        "read" => Perms {
            read: true,
            search: true,
            ..Perms::default()
        },
        "write" => Perms {
            create: true,
            update: true,
            delete: true,
            ..Perms::default()
        },
        "*" => Perms {
            create: true,
            read: true,
            update: true,
            delete: true,
            search: true,
        },
        // v2: letters from "cruds", each at most once, in that order
        letters => {
            if letters.is_empty() {
                return None;
            }
            let mut p = Perms::default();
            let mut last = None;
            for ch in letters.chars() {
                let idx = "cruds".find(ch)?;
                if last.is_some_and(|l| idx <= l) {
                    return None; // out of order or repeated: SMART lets servers refuse these
                }
                last = Some(idx);
                match ch {
                    'c' => p.create = true,
                    'r' => p.read = true,
                    'u' => p.update = true,
                    'd' => p.delete = true,
                    _ => p.search = true,
                }
            }
            p
        }
    };
    let mut constraints = Vec::new();
    if let Some(q) = query {
        if q.is_empty() {
            return None;
        }
        for pair in q.split('&') {
            let (k, v) = pair.split_once('=')?;
            if k.is_empty() {
                return None;
            }
            constraints.push((k.to_string(), v.to_string()));
        }
    }
    Some(Scope {
        level,
        resource: resource.to_string(),
        perms,
        constraints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs(set: &ScopeSet, level: Level) -> (bool, bool, bool) {
        let p = set.granted(level, "ImagingStudy");
        (p.read, p.search, p.create)
    }

    #[test]
    fn v1_and_v2_forms() {
        for s in [
            "patient/ImagingStudy.rs",
            "patient/ImagingStudy.read",
            "patient/*.read",
            "patient/*.rs",
            "patient/*.*",
            "patient/ImagingStudy.r patient/ImagingStudy.s",
            "patient/ImagingStudy.cruds",
            "openid fhirUser launch/patient patient/ImagingStudy.rs",
        ] {
            let set = ScopeSet::parse(s);
            let (r, sr, _) = rs(&set, Level::Patient);
            assert!(r && sr, "{s} should grant read+search");
        }
    }

    #[test]
    fn writes() {
        for s in [
            "patient/ImagingStudy.c",
            "patient/ImagingStudy.cud",
            "patient/ImagingStudy.write",
            "patient/ImagingStudy.*",
            "patient/*.cruds",
        ] {
            assert!(
                ScopeSet::parse(s)
                    .granted(Level::Patient, "ImagingStudy")
                    .create,
                "{s}"
            );
        }
        assert!(
            !ScopeSet::parse("patient/ImagingStudy.rs")
                .granted(Level::Patient, "ImagingStudy")
                .create
        );
    }

    #[test]
    fn partial_or_foreign_scopes_do_not_grant_imaging_read() {
        for s in [
            "patient/ImagingStudy.r",
            "patient/ImagingStudy.s",
            "patient/Observation.rs",
            "patient/DiagnosticReport.read",
            "patient/ImagingStudy.sr",  // out of order
            "patient/ImagingStudy.rrs", // repeated
            "patient/ImagingStudy.x",
            "patient/ImagingStudy.",
            "patient/imagingStudy.rs",
            "Patient/ImagingStudy.rs",
            "patient/ImagingStudy.rs?",
            "patient/ImagingStudy.rs?modality=CT",
            "launch/patient openid",
            "",
        ] {
            let set = ScopeSet::parse(s);
            let (r, sr, _) = rs(&set, Level::Patient);
            assert!(!(r && sr), "{s:?} must not grant imaging read");
        }
    }

    #[test]
    fn levels_are_kept_apart() {
        let set = ScopeSet::parse("user/ImagingStudy.rs system/*.read");
        assert!(set.granted(Level::Patient, "ImagingStudy").is_empty());
        assert!(set.granted(Level::User, "ImagingStudy").read);
        assert!(set.granted(Level::System, "ImagingStudy").search);
    }

    #[test]
    fn constraints_are_parsed_but_grant_nothing() {
        let set = ScopeSet::parse("patient/ImagingStudy.rs?modality=CT&started=ge2020");
        assert_eq!(
            set.scopes[0].constraints,
            vec![
                ("modality".into(), "CT".into()),
                ("started".into(), "ge2020".into())
            ]
        );
        assert!(set.granted(Level::Patient, "ImagingStudy").is_empty());
        assert_eq!(set.levels_naming("ImagingStudy"), vec![Level::Patient]);
    }

    #[test]
    fn display_of_perms() {
        let set = ScopeSet::parse("patient/*.read patient/ImagingStudy.c");
        assert_eq!(
            set.granted(Level::Patient, "ImagingStudy").to_string(),
            "crs"
        );
    }
}
