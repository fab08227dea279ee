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
    /// Whether every interaction of `self` is one of `o`'s.
    pub fn within(&self, o: &Perms) -> bool {
        (!self.create || o.create)
            && (!self.read || o.read)
            && (!self.update || o.update)
            && (!self.delete || o.delete)
            && (!self.search || o.search)
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
    /// `?name=value` constraints in order, as written (see [`Scope::study_constraints`]).
    pub constraints: Vec<(String, String)>,
}

/// The scope as SMART v2 writes it (`patient/ImagingStudy.rs?modality=CT`); it parses back to
/// itself. A scope without interactions has no text of its own and is never written.
impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            Level::Patient => "patient",
            Level::User => "user",
            Level::System => "system",
        };
        write!(f, "{level}/{}.{}", self.resource, self.perms)?;
        for (i, (k, v)) in self.constraints.iter().enumerate() {
            write!(f, "{}{k}={v}", if i == 0 { '?' } else { '&' })?;
        }
        Ok(())
    }
}

/// The DICOM code system, the only system a `modality` constraint may name.
pub(crate) const DICOM_CODES: &str = "http://dicom.nema.org/resources/ontology/DCM";
/// The identifier system of a study's Study Instance UID in FHIR.
pub(crate) const DICOM_UID_SYSTEM: &str = "urn:dicom:uid";

/// A granular-scope constraint on ImagingStudy that can be evaluated on a study. Several
/// constraints in one scope must all hold; comma-separated values within one are alternatives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constraint {
    /// `modality=[system|]code[,..]`: one of these codes is among the study's modalities.
    Modality(Vec<String>),
    /// `started=[prefix]date[,..]`: the study's date passes one of these tests.
    Started(Vec<DateTest>),
    /// `identifier=[urn:dicom:uid|]urn:oid:UID[,..]`: the study is one of these (UIDs without
    /// the `urn:oid:` prefix).
    StudyUid(Vec<String>),
}

/// FHIR date search prefixes the gateway evaluates (`ap` is left out: its width is the
/// server's choice, so it cannot be evaluated the same way the EHR would).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateOp {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
}

/// One date test. `lo..=hi` is the range of days the value's precision covers (`2020` covers
/// the whole year), both as `YYYYMMDD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DateTest {
    pub op: DateOp,
    pub lo: String,
    pub hi: String,
}

impl DateTest {
    fn parse(v: &str) -> Option<DateTest> {
        let (op, date) = match v.get(..2) {
            Some("eq") => (DateOp::Eq, &v[2..]),
            Some("ne") => (DateOp::Ne, &v[2..]),
            Some("gt") => (DateOp::Gt, &v[2..]),
            Some("lt") => (DateOp::Lt, &v[2..]),
            Some("ge") => (DateOp::Ge, &v[2..]),
            Some("le") => (DateOp::Le, &v[2..]),
            Some("sa") => (DateOp::Sa, &v[2..]),
            Some("eb") => (DateOp::Eb, &v[2..]),
            _ => (DateOp::Eq, v),
        };
        // Only dates: a time of day would need the study's time zone, which DICOM rarely has.
        let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
        let parts: Vec<&str> = date.split('-').collect();
        let (lo, hi) = match parts.as_slice() {
            [y] if digits(y, 4) => (format!("{y}0101"), format!("{y}1231")),
            [y, m] if digits(y, 4) && digits(m, 2) && ("01"..="12").contains(m) => {
                (format!("{y}{m}01"), format!("{y}{m}31"))
            }
            [y, m, d]
                if digits(y, 4)
                    && digits(m, 2)
                    && digits(d, 2)
                    && ("01"..="12").contains(m)
                    && is_day_of(y, m, d) =>
            {
                (format!("{y}{m}{d}"), format!("{y}{m}{d}"))
            }
            _ => return None,
        };
        Some(DateTest { op, lo, hi })
    }

    /// Whether a day (`YYYYMMDD`) passes, as FHIR date search compares a one-day target.
    pub fn passes(&self, day: &str) -> bool {
        if day.len() != 8 || !day.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        let (lo, hi) = (self.lo.as_str(), self.hi.as_str());
        match self.op {
            DateOp::Eq => lo <= day && day <= hi,
            DateOp::Ne => !(lo <= day && day <= hi),
            DateOp::Gt | DateOp::Sa => day > hi,
            DateOp::Lt | DateOp::Eb => day < lo,
            DateOp::Ge => day >= lo,
            DateOp::Le => day <= hi,
        }
    }
}

/// Whether `d` is a day of month `m` of year `y` (all digits, already checked).
fn is_day_of(y: &str, m: &str, d: &str) -> bool {
    let (Ok(y), Ok(m), Ok(d)) = (y.parse::<u32>(), m.parse::<u32>(), d.parse::<u32>()) else {
        return false;
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match m {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    (1..=days).contains(&d)
}

fn is_uid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_digit())
                && (c == "0" || !c.starts_with('0'))
        })
}

impl Scope {
    /// The scope's constraints as the gateway can evaluate them on a study: `Some(vec![])` when
    /// it has none, `None` when any of them is one the gateway cannot evaluate (an unknown
    /// parameter, a modifier, a foreign code system, a time of day, `ap`): such a scope grants
    /// nothing.
    pub fn study_constraints(&self) -> Option<Vec<Constraint>> {
        let mut out = Vec::with_capacity(self.constraints.len());
        for (k, v) in &self.constraints {
            let v = url::form_urlencoded::parse(format!("v={v}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())?;
            let values: Vec<&str> = v.split(',').collect();
            if values.iter().any(|x| x.is_empty()) {
                return None;
            }
            let c = match k.as_str() {
                "modality" => Constraint::Modality(
                    values
                        .iter()
                        .map(|x| match x.split_once('|') {
                            None => Some(x.to_string()),
                            // `|code` means "no system" in FHIR: DICOM codes have one.
                            Some((DICOM_CODES, code)) if !code.is_empty() => Some(code.to_string()),
                            _ => None,
                        })
                        .collect::<Option<Vec<_>>>()?,
                ),
                "started" => Constraint::Started(
                    values
                        .iter()
                        .map(|x| DateTest::parse(x))
                        .collect::<Option<Vec<_>>>()?,
                ),
                "identifier" => Constraint::StudyUid(
                    values
                        .iter()
                        .map(|x| {
                            let value = match x.split_once('|') {
                                None => *x,
                                Some((DICOM_UID_SYSTEM, v)) => v,
                                _ => return None,
                            };
                            value
                                .strip_prefix("urn:oid:")
                                .filter(|u| is_uid(u))
                                .map(str::to_string)
                        })
                        .collect::<Option<Vec<_>>>()?,
                ),
                _ => return None,
            };
            out.push(c);
        }
        Some(out)
    }
}

/// All of a token's scopes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeSet {
    pub scopes: Vec<Scope>,
    /// Scope strings that are not resource scopes (`openid`, `launch/patient`, malformed ones...).
    pub other: Vec<String>,
}

impl fmt::Display for ScopeSet {
    /// The resource scopes, space-separated (the others are not written).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.scopes.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
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

    /// Under which constraints the scopes at `levels` grant an interaction (`has`) on
    /// `resource`: `None` when none grants it; otherwise the alternatives, one per granting
    /// scope, where an empty alternative (an unconstrained scope) grants it everywhere. Scopes
    /// with a constraint the gateway cannot evaluate are left out.
    pub fn grants(
        &self,
        levels: &[Level],
        resource: &str,
        has: impl Fn(&Perms) -> bool,
    ) -> Option<Vec<Vec<Constraint>>> {
        let alts: Vec<Vec<Constraint>> = self
            .scopes
            .iter()
            .filter(|s| levels.contains(&s.level) && (s.resource == resource || s.resource == "*"))
            .filter(|s| has(&s.perms))
            .filter_map(Scope::study_constraints)
            .collect();
        (!alts.is_empty()).then_some(alts)
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
    fn a_scope_is_written_as_it_parses() {
        for (text, written) in [
            ("patient/ImagingStudy.read", "patient/ImagingStudy.rs"),
            ("user/*.*", "user/*.cruds"),
            (
                "patient/ImagingStudy.rs?modality=CT&started=ge2020",
                "patient/ImagingStudy.rs?modality=CT&started=ge2020",
            ),
            ("system/ImagingStudy.c", "system/ImagingStudy.c"),
        ] {
            let set = ScopeSet::parse(text);
            assert_eq!(set.to_string(), written);
            assert_eq!(ScopeSet::parse(written).scopes, set.scopes, "{written}");
        }
        let r = ScopeSet::parse("patient/ImagingStudy.r").scopes[0].perms;
        let rs = ScopeSet::parse("patient/ImagingStudy.rs").scopes[0].perms;
        assert!(r.within(&rs) && !rs.within(&r) && rs.within(&rs));
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

    #[test]
    fn evaluable_constraints() {
        let c = |s: &str| ScopeSet::parse(s).scopes[0].study_constraints();
        assert_eq!(
            c("patient/ImagingStudy.rs?modality=CT,MR&started=ge2020-03"),
            Some(vec![
                Constraint::Modality(vec!["CT".into(), "MR".into()]),
                Constraint::Started(vec![DateTest {
                    op: DateOp::Ge,
                    lo: "20200301".into(),
                    hi: "20200331".into()
                }])
            ])
        );
        assert_eq!(
            c("patient/ImagingStudy.rs?identifier=urn:dicom:uid%7Curn:oid:1.2.840.10008"),
            Some(vec![Constraint::StudyUid(vec!["1.2.840.10008".into()])])
        );
        assert_eq!(c("patient/ImagingStudy.rs"), Some(vec![]));
        for bad in [
            "patient/ImagingStudy.rs?patient=123",
            "patient/ImagingStudy.rs?modality:text=CT",
            "patient/ImagingStudy.rs?modality=CT,",
            "patient/ImagingStudy.rs?modality=urn:x|CT",
            "patient/ImagingStudy.rs?started=2020-13",
            "patient/ImagingStudy.rs?started=2020-02-30T00:00",
            "patient/ImagingStudy.rs?started=ap2020",
            "patient/ImagingStudy.rs?started=20200101",
            "patient/ImagingStudy.rs?identifier=urn:oid:1.02.3",
            "patient/ImagingStudy.rs?identifier=1.2.3",
            "patient/ImagingStudy.rs?identifier=urn:other|urn:oid:1.2.3",
            "patient/ImagingStudy.rs?identifier=|urn:oid:1.2.3",
            "patient/ImagingStudy.rs?modality=|CT",
            "patient/ImagingStudy.rs?modality=%7CCT",
            "patient/ImagingStudy.rs?started=2021-02-29",
            "patient/ImagingStudy.rs?started=ne2020-04-31",
        ] {
            assert_eq!(c(bad), None, "{bad}");
        }
    }

    #[test]
    fn fhir_date_comparisons_on_a_day() {
        let t = |v: &str| DateTest::parse(v).unwrap();
        let day = "20200115";
        for (v, expected) in [
            ("2020", true),
            ("2020-01", true),
            ("2020-01-15", true),
            ("2020-01-16", false),
            ("eq2019", false),
            ("ne2020", false),
            ("ne2021", true),
            ("gt2020-01-14", true),
            ("gt2020-01", false),
            ("ge2020-01", true),
            ("ge2020-01-16", false),
            ("lt2020-01-16", true),
            ("lt2020", false),
            ("le2020-01-15", true),
            ("le2020-01-14", false),
            ("sa2019", true),
            ("eb2021", true),
            ("eb2020", false),
        ] {
            assert_eq!(t(v).passes(day), expected, "{v}");
        }
        assert!(DateTest::parse("2020-02-29").is_some(), "a leap day");
        assert!(DateTest::parse("1900-02-29").is_none());
        assert!(DateTest::parse("2000-02-29").is_some());
        assert!(!t("2020").passes(""));
        assert!(!t("2020").passes("2020011"));
    }

    #[test]
    fn grants_collect_alternatives() {
        let set = ScopeSet::parse(
            "patient/ImagingStudy.rs?modality=CT patient/*.r user/ImagingStudy.rs?category=x",
        );
        let r = set.grants(&[Level::Patient], "ImagingStudy", |p| p.read);
        assert_eq!(
            r,
            Some(vec![vec![Constraint::Modality(vec!["CT".into()])], vec![]])
        );
        let s = set.grants(&[Level::Patient], "ImagingStudy", |p| p.search);
        assert_eq!(s, Some(vec![vec![Constraint::Modality(vec!["CT".into()])]]));
        assert_eq!(
            set.grants(&[Level::User, Level::System], "ImagingStudy", |p| p.read),
            None
        );
    }
}
