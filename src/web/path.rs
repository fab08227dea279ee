//! DICOMweb paths and query strings, parsed strictly.
//!
//! Owns: turning the raw request path under `/dicom-web` into a [`Resource`] whose UIDs are
//! validated (digits and dots, at most 64 characters); anything else (percent-encoding, `..`,
//! empty segments, unknown words) is refused. Upstream URLs are rebuilt from the parsed parts
//! only. Also decodes a query string once and re-encodes it the way PACS expect (`*`, `?`, `^`
//! and `,` left as they are). Must not know policy.

/// What a DICOMweb path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// QIDO-RS search at a level, within a study or series when given.
    Search {
        level: SearchLevel,
        study: Option<String>,
        series: Option<String>,
    },
    /// WADO-RS retrieval of a study, series or instance.
    Retrieve {
        study: String,
        series: Option<String>,
        instance: Option<String>,
        what: Part,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchLevel {
    Studies,
    Series,
    Instances,
}

/// Which representation a retrieval asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Instances,
    Metadata,
    Rendered,
    Thumbnail,
    /// A frame list, e.g. `1,3`.
    Frames(String),
    /// Frames rendered, or their thumbnail (`frames/{list}/rendered`, `.../thumbnail`).
    FrameRendered(String),
    FrameThumbnail(String),
    /// A bulk data path below an instance (Orthanc's `bulk/...` form), as validated segments.
    Bulk(Vec<String>),
}

/// Whether a string is a DICOM UID (the one rule, PS3.5 9.1).
pub use crate::dicom::values::is_uid;

fn uid(s: &str) -> Result<String, String> {
    if is_uid(s) {
        Ok(s.to_string())
    } else {
        Err("a path segment is not a valid UID (digits and dots, at most 64 characters)".into())
    }
}

fn frames(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 256
        && s.split(',').all(|f| {
            !f.is_empty() && f.len() <= 9 && f.bytes().all(|b| b.is_ascii_digit()) && f != "0"
        });
    if ok {
        Ok(s.to_string())
    } else {
        Err("invalid frame list".into())
    }
}

/// Parses the raw (still percent-encoded) path that follows `/dicom-web/`.
pub fn parse(raw: &str) -> Result<Resource, String> {
    if raw.contains('%') {
        return Err("percent-encoded characters are not allowed in DICOMweb paths".into());
    }
    let segs: Vec<&str> = raw.split('/').collect();
    if segs.iter().any(|s| s.is_empty() || *s == "." || *s == "..") {
        return Err("empty, '.' or '..' path segments are not allowed".into());
    }
    let search = |level, study: Option<&str>, series: Option<&str>| -> Result<Resource, String> {
        Ok(Resource::Search {
            level,
            study: study.map(uid).transpose()?,
            series: series.map(uid).transpose()?,
        })
    };
    let retrieve = |study: &str,
                    series: Option<&str>,
                    instance: Option<&str>,
                    what: Part|
     -> Result<Resource, String> {
        Ok(Resource::Retrieve {
            study: uid(study)?,
            series: series.map(uid).transpose()?,
            instance: instance.map(uid).transpose()?,
            what,
        })
    };
    let part = |word: &str| match word {
        "metadata" => Some(Part::Metadata),
        "rendered" => Some(Part::Rendered),
        "thumbnail" => Some(Part::Thumbnail),
        _ => None,
    };
    let unknown = || Err("unknown DICOMweb resource".to_string());
    match segs.as_slice() {
        ["studies"] => search(SearchLevel::Studies, None, None),
        ["series"] => search(SearchLevel::Series, None, None),
        ["instances"] => search(SearchLevel::Instances, None, None),
        ["studies", s] => retrieve(s, None, None, Part::Instances),
        ["studies", s, "series"] => search(SearchLevel::Series, Some(s), None),
        ["studies", s, "instances"] => search(SearchLevel::Instances, Some(s), None),
        ["studies", s, w] => match part(w) {
            Some(p) => retrieve(s, None, None, p),
            None => unknown(),
        },
        ["studies", s, "series", r] => retrieve(s, Some(r), None, Part::Instances),
        ["studies", s, "series", r, "instances"] => {
            search(SearchLevel::Instances, Some(s), Some(r))
        }
        ["studies", s, "series", r, w] => match part(w) {
            Some(p) => retrieve(s, Some(r), None, p),
            None => unknown(),
        },
        ["studies", s, "series", r, "instances", i] => {
            retrieve(s, Some(r), Some(i), Part::Instances)
        }
        ["studies", s, "series", r, "instances", i, "frames", f] => {
            retrieve(s, Some(r), Some(i), Part::Frames(frames(f)?))
        }
        ["studies", s, "series", r, "instances", i, "frames", f, w] => {
            let f = frames(f)?;
            match *w {
                "rendered" => retrieve(s, Some(r), Some(i), Part::FrameRendered(f)),
                "thumbnail" => retrieve(s, Some(r), Some(i), Part::FrameThumbnail(f)),
                _ => unknown(),
            }
        }
        ["studies", s, "series", r, "instances", i, "bulk", rest @ ..]
            if !rest.is_empty() && rest.len() <= 16 =>
        {
            let ok = rest
                .iter()
                .all(|x| x.len() <= 16 && x.bytes().all(|b| b.is_ascii_hexdigit()));
            if !ok {
                return Err("invalid bulk data path".into());
            }
            retrieve(
                s,
                Some(r),
                Some(i),
                Part::Bulk(rest.iter().map(|x| x.to_string()).collect()),
            )
        }
        ["studies", s, "series", r, "instances", i, w] => match part(w) {
            Some(p) => retrieve(s, Some(r), Some(i), p),
            None => unknown(),
        },
        _ => unknown(),
    }
}

impl Resource {
    /// The path below the DICOMweb root, rebuilt from the parsed parts only.
    pub fn upstream_path(&self) -> String {
        match self {
            Resource::Search {
                level,
                study,
                series,
            } => {
                let leaf = match level {
                    SearchLevel::Studies => "studies",
                    SearchLevel::Series => "series",
                    SearchLevel::Instances => "instances",
                };
                match (study, series) {
                    (Some(s), Some(r)) => format!("studies/{s}/series/{r}/{leaf}"),
                    (Some(s), None) => format!("studies/{s}/{leaf}"),
                    _ => leaf.to_string(),
                }
            }
            Resource::Retrieve {
                study,
                series,
                instance,
                what,
            } => {
                let mut p = format!("studies/{study}");
                if let Some(r) = series {
                    p.push_str(&format!("/series/{r}"));
                }
                if let Some(i) = instance {
                    p.push_str(&format!("/instances/{i}"));
                }
                match what {
                    Part::Instances => {}
                    Part::Metadata => p.push_str("/metadata"),
                    Part::Rendered => p.push_str("/rendered"),
                    Part::Thumbnail => p.push_str("/thumbnail"),
                    Part::Frames(f) => p.push_str(&format!("/frames/{f}")),
                    Part::FrameRendered(f) => p.push_str(&format!("/frames/{f}/rendered")),
                    Part::FrameThumbnail(f) => p.push_str(&format!("/frames/{f}/thumbnail")),
                    Part::Bulk(segs) => {
                        p.push_str("/bulk");
                        for s in segs {
                            p.push('/');
                            p.push_str(s);
                        }
                    }
                }
                p
            }
        }
    }
}

/// Decodes a query string once into (key, value) pairs. `+` is a space, as HTML forms and most
/// clients encode it (a literal plus arrives as `%2B`).
pub fn decode_query(q: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dec = |s: &str| {
            percent_decode(s).ok_or_else(|| "malformed percent-encoding in the query".to_string())
        };
        out.push((dec(k)?, dec(v)?));
        if out.len() > 256 {
            return Err("too many query parameters".into());
        }
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Encodes decoded query pairs for the PACS: everything but unreserved characters and the
/// DICOM matching characters `*`, `?`, `^`, `,` (and `/`, `:`, which a query may hold as they are)
/// is percent-encoded.
pub fn encode_query(pairs: &[(String, String)]) -> String {
    let enc = |s: &str| {
        let mut o = String::with_capacity(s.len());
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~*?^,/:".contains(&b) {
                o.push(b as char);
            } else {
                o.push_str(&format!("%{b:02X}"));
            }
        }
        o
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "1.2.3";
    const R: &str = "1.2.3.4";
    const I: &str = "1.2.3.4.5";

    #[test]
    fn every_route_parses_and_rebuilds() {
        for p in [
            "studies".to_string(),
            "series".into(),
            "instances".into(),
            format!("studies/{S}"),
            format!("studies/{S}/metadata"),
            format!("studies/{S}/rendered"),
            format!("studies/{S}/thumbnail"),
            format!("studies/{S}/series"),
            format!("studies/{S}/instances"),
            format!("studies/{S}/series/{R}"),
            format!("studies/{S}/series/{R}/metadata"),
            format!("studies/{S}/series/{R}/instances"),
            format!("studies/{S}/series/{R}/instances/{I}"),
            format!("studies/{S}/series/{R}/instances/{I}/metadata"),
            format!("studies/{S}/series/{R}/instances/{I}/frames/1,2"),
            format!("studies/{S}/series/{R}/instances/{I}/frames/2/rendered"),
            format!("studies/{S}/series/{R}/instances/{I}/frames/2/thumbnail"),
            format!("studies/{S}/series/{R}/instances/{I}/rendered"),
            format!("studies/{S}/series/{R}/instances/{I}/thumbnail"),
            format!("studies/{S}/series/{R}/instances/{I}/bulk/7fe00010"),
        ] {
            let r = parse(&p).unwrap_or_else(|e| panic!("{p}: {e}"));
            assert_eq!(r.upstream_path(), p);
        }
    }

    #[test]
    fn tricks_are_refused() {
        for p in [
            format!("studies/{S}/../2.3"),
            format!("studies/{S}/%2e%2e/2.3"),
            format!("studies/{S}%2Fseries"),
            format!("studies//{S}"),
            format!("studies/{S}/"),
            "studies/1.2.abc".to_string(),
            "studies/1..2".into(),
            "studies/.1.2".into(),
            format!("studies/{}", "1".repeat(65)),
            format!("studies/{S}/series/{R}/instances/{I}/frames/0"),
            format!("studies/{S}/series/{R}/instances/{I}/frames/1;2"),
            format!("studies/{S}/series/{R}/instances/{I}/bulk/../x"),
            format!("studies/{S}/whatever"),
            "patients".into(),
            "".into(),
        ] {
            assert!(parse(&p).is_err(), "{p} must be refused");
        }
    }

    #[test]
    fn queries_are_decoded_once_and_reencoded_for_the_pacs() {
        let q = decode_query(
            "PatientName=Doe%5EAl*&StudyDate=20240101-&includefield=00081030%2C00100020&x=a+b",
        )
        .unwrap();
        assert_eq!(q[0], ("PatientName".into(), "Doe^Al*".into()));
        assert_eq!(q[2].1, "00081030,00100020");
        assert_eq!(q[3].1, "a b");
        assert_eq!(decode_query("x=a%2Bb").unwrap()[0].1, "a+b");
        let e = encode_query(&q);
        assert_eq!(
            e,
            "PatientName=Doe^Al*&StudyDate=20240101-&includefield=00081030,00100020&x=a%20b"
        );
        assert!(decode_query("a=%zz").is_err());
        assert!(decode_query("a=%e2%82").is_err(), "not UTF-8");
        // a double-encoded value stays encoded once (decoded once only)
        assert_eq!(decode_query("a=%252A").unwrap()[0].1, "%2A");
        assert_eq!(encode_query(&[("a".into(), "%2A".into())]), "a=%252A");
    }
}
