//! Private keys as registrations hand them out: a JWK or a JWK Set (RFC 7517) holding the
//! private key, turned into the PKCS#8 DER the rest of [`super`] loads.
//!
//! Owns: choosing the key for an algorithm in a set, and the two DER shapes (RFC 8017
//! RSAPrivateKey, RFC 5915 ECPrivateKey, each in an RFC 5208 PrivateKeyInfo). Must not know
//! what the key signs. The result is checked by the crypto library when it is loaded (an EC
//! public point that does not belong to `d`, RSA factors that do not multiply out, are refused
//! there).

use anyhow::{Context, bail};
use base64::Engine;
use jsonwebtoken::Algorithm;
use serde_json::Value;

const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];

/// A private key for `alg` from a JWK or JWK Set document: its PKCS#8 DER and its `kid`.
pub(crate) fn private_key(
    doc: &Value,
    alg: Algorithm,
) -> anyhow::Result<(Vec<u8>, Option<String>)> {
    let keys: Vec<&Value> = match doc.get("keys") {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(_) => bail!("\"keys\" is not an array"),
        None => vec![doc],
    };
    let mut why = Vec::new();
    for k in keys {
        match usable(k, alg) {
            Ok(()) => {
                let der = pkcs8(k, alg)?;
                let kid = k.get("kid").and_then(Value::as_str).map(str::to_string);
                return Ok((der, kid));
            }
            Err(e) => why.push(e),
        }
    }
    bail!(
        "no private key for {alg:?} in the JWK{}: {}",
        if doc.get("keys").is_some() {
            " Set"
        } else {
            ""
        },
        why.join("; ")
    )
}

/// Of `algs`, the one the first usable private key in a JWK or JWK Set signs with (a set's
/// order is the registration's preference).
pub(crate) fn first_usable(doc: &Value, algs: &[Algorithm]) -> Option<Algorithm> {
    let keys: Vec<&Value> = match doc.get("keys") {
        Some(Value::Array(a)) => a.iter().collect(),
        _ => vec![doc],
    };
    keys.iter()
        .find_map(|k| algs.iter().copied().find(|a| usable(k, *a).is_ok()))
}

/// Whether one JWK can sign with `alg`; else why not.
fn usable(k: &Value, alg: Algorithm) -> Result<(), String> {
    let s = |name: &str| k.get(name).and_then(Value::as_str);
    let kid = s("kid").map(|k| format!(" {k:?}")).unwrap_or_default();
    let (kty, crv) = match alg {
        Algorithm::ES256 => ("EC", Some("P-256")),
        Algorithm::ES384 => ("EC", Some("P-384")),
        _ => ("RSA", None),
    };
    if s("kty") != Some(kty) || (crv.is_some() && s("crv") != crv) {
        return Err(format!("key{kid} is not {kty} {}", crv.unwrap_or("")));
    }
    if s("d").is_none() {
        return Err(format!(
            "key{kid} is a public key (no \"d\"); the file must hold the private key"
        ));
    }
    if let Some(a) = s("alg")
        && a != format!("{alg:?}")
    {
        return Err(format!("key{kid} is for {a}"));
    }
    if let Some(u) = s("use")
        && u != "sig"
    {
        return Err(format!("key{kid} is for use {u:?}, not \"sig\""));
    }
    Ok(())
}

fn member(k: &Value, name: &str) -> anyhow::Result<Vec<u8>> {
    let text = k
        .get(name)
        .and_then(Value::as_str)
        .with_context(|| format!("the JWK has no \"{name}\""))?;
    B64URL
        .decode(text.trim_end_matches('='))
        .with_context(|| format!("the JWK's \"{name}\" is not base64url"))
}

fn pkcs8(k: &Value, alg: Algorithm) -> anyhow::Result<Vec<u8>> {
    match alg {
        Algorithm::ES256 | Algorithm::ES384 => {
            let (size, curve) = if alg == Algorithm::ES256 {
                (32, OID_P256)
            } else {
                (48, OID_P384)
            };
            let fixed = |name: &str| -> anyhow::Result<Vec<u8>> {
                let v = member(k, name)?;
                if v.len() > size {
                    bail!("the JWK's \"{name}\" is longer than the curve's {size} bytes");
                }
                let mut out = vec![0u8; size - v.len()];
                out.extend(v);
                Ok(out)
            };
            let (d, x, y) = (fixed("d")?, fixed("x")?, fixed("y")?);
            let mut point = vec![0x00, 0x04];
            point.extend(x);
            point.extend(y);
            let ec = seq(&[
                tlv(0x02, &[1]),
                tlv(0x04, &d),
                tlv(0xa0, &tlv(0x06, curve)),
                tlv(0xa1, &tlv(0x03, &point)),
            ]);
            Ok(seq(&[
                tlv(0x02, &[0]),
                seq(&[tlv(0x06, OID_EC_PUBLIC_KEY), tlv(0x06, curve)]),
                tlv(0x04, &ec),
            ]))
        }
        _ => {
            let mut parts = vec![tlv(0x02, &[0])];
            for name in ["n", "e", "d", "p", "q", "dp", "dq", "qi"] {
                let v = member(k, name).with_context(|| {
                    "an RSA private JWK needs n, e, d, p, q, dp, dq and qi".to_string()
                })?;
                parts.push(uint(&v));
            }
            if k.get("oth").is_some() {
                bail!("RSA keys with more than two primes (\"oth\") are not supported");
            }
            let rsa = seq(&parts);
            Ok(seq(&[
                tlv(0x02, &[0]),
                seq(&[tlv(0x06, OID_RSA_ENCRYPTION), tlv(0x05, &[])]),
                tlv(0x04, &rsa),
            ]))
        }
    }
}

/// A DER element: tag, definite length, content.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

fn seq(parts: &[Vec<u8>]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

/// A non-negative INTEGER from big-endian bytes: no leading zeros, one added when the high
/// bit is set.
fn uint(be: &[u8]) -> Vec<u8> {
    let trimmed: Vec<u8> = be.iter().copied().skip_while(|b| *b == 0).collect();
    let mut content = Vec::with_capacity(trimmed.len() + 1);
    if trimmed.first().is_none_or(|b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend(trimmed);
    tlv(0x02, &content)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{SigningKey, pem_der};
    use serde_json::json;
    use x509_parser::der_parser::parse_der;

    /// The content of every element of the DER SEQUENCE inside a PKCS#8 key's OCTET STRING.
    fn inner(pkcs8: &[u8]) -> Vec<Vec<u8>> {
        let (_, info) = parse_der(pkcs8).expect("PKCS#8");
        let info = info.as_sequence().expect("a SEQUENCE");
        let key = info[2].as_slice().expect("an OCTET STRING");
        let (_, key) = parse_der(key).expect("the inner key");
        key.as_sequence()
            .expect("a SEQUENCE")
            .iter()
            .map(|o| o.as_slice().map(<[u8]>::to_vec).unwrap_or_default())
            .collect()
    }

    /// The private JWK of a generated key, as a registration would hand it out.
    fn private_jwk(k: &SigningKey, kid: &str) -> Value {
        let der = pem_der(&k.pkcs8_pem).expect("PEM");
        let parts = inner(&der);
        let b = |v: &[u8]| B64URL.encode(v);
        let mut jwk = k.public_jwk.clone();
        jwk["kid"] = json!(kid);
        match jwk["kty"].as_str() {
            Some("EC") => jwk["d"] = json!(b(&parts[1])),
            _ => {
                for (i, name) in ["n", "e", "d", "p", "q", "dp", "dq", "qi"]
                    .iter()
                    .enumerate()
                {
                    jwk[*name] = json!(b(&parts[i + 1]));
                }
            }
        }
        jwk
    }

    #[test]
    fn a_private_jwk_or_jwk_set_loads_as_the_same_key_with_its_kid() {
        let dir = std::env::temp_dir().join(format!("pacsgate-jwk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for alg in [Algorithm::ES256, Algorithm::ES384, Algorithm::RS384] {
            let original = SigningKey::generate(alg).expect("generate");
            let jwk = private_jwk(&original, "registered-1");
            let mut public_only = original.public_jwk.clone();
            public_only["kid"] = json!("public");
            let mut for_enc = jwk.clone();
            for_enc["use"] = json!("enc");
            for_enc["kid"] = json!("enc");
            let set = json!({ "keys": [public_only, for_enc, jwk] });
            for (what, doc) in [("JWK", &jwk), ("JWK Set", &set)] {
                let path = dir.join(format!("{alg:?}-{}.json", what.replace(' ', "")));
                std::fs::write(&path, doc.to_string()).expect("write");
                let k = SigningKey::load(&path, alg)
                    .unwrap_or_else(|e| panic!("{alg:?} {what}: {e:#}"));
                assert_eq!(
                    k.kid, "registered-1",
                    "{alg:?} {what}: the registered kid is kept"
                );
                for m in ["n", "e", "x", "y"] {
                    assert_eq!(
                        k.public_jwk.get(m),
                        original.public_jwk.get(m),
                        "{alg:?} {what}: {m}"
                    );
                }
                // What it signs verifies with the original's public key.
                let token = k
                    .sign(&json!({"sub": "x", "exp": 4_000_000_000u64}))
                    .expect("sign");
                let mut v = jsonwebtoken::Validation::new(alg);
                v.validate_aud = false;
                jsonwebtoken::decode::<Value>(&token, original.decoding(), &v)
                    .unwrap_or_else(|e| panic!("{alg:?} {what}: {e}"));
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_jwk_sets_first_private_key_is_the_one_used_whatever_its_type() {
        let dir = std::env::temp_dir().join(format!("pacsgate-jwk-order-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ec = private_jwk(
            &SigningKey::generate(Algorithm::ES384).expect("ec"),
            "ec-first",
        );
        let rsa = private_jwk(
            &SigningKey::generate(Algorithm::RS384).expect("rsa"),
            "rsa-second",
        );
        let algs = crate::config::CLIENT_KEY_ALGS;
        for (keys, kid) in [
            (vec![ec.clone(), rsa.clone()], "ec-first"),
            (vec![rsa, ec], "rsa-second"),
        ] {
            let path = dir.join(format!("{kid}.json"));
            std::fs::write(&path, json!({ "keys": keys }).to_string()).expect("write");
            let k = SigningKey::load_any(&path, &algs).expect("load");
            assert_eq!(k.kid, kid);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn keys_that_cannot_sign_are_refused_with_the_reason() {
        let ec = SigningKey::generate(Algorithm::ES256).expect("generate");
        let rsa = SigningKey::generate(Algorithm::RS384).expect("generate");
        let mut wrong_d = private_jwk(&ec, "k");
        let other = private_jwk(
            &SigningKey::generate(Algorithm::ES256).expect("generate"),
            "o",
        );
        wrong_d["d"] = other["d"].clone();
        let mut pinned = private_jwk(&rsa, "r");
        pinned["alg"] = json!("RS256");
        let mut no_crt = private_jwk(&rsa, "r");
        for m in ["p", "q", "dp", "dq", "qi"] {
            no_crt.as_object_mut().expect("object").remove(m);
        }
        let cases: Vec<(&str, Value, Algorithm, &str)> = vec![
            (
                "a public key",
                ec.public_jwk.clone(),
                Algorithm::ES256,
                "public key",
            ),
            (
                "another curve",
                private_jwk(&ec, "k"),
                Algorithm::ES384,
                "not EC P-384",
            ),
            (
                "an RSA key for ES256",
                private_jwk(&rsa, "r"),
                Algorithm::ES256,
                "not EC",
            ),
            (
                "pinned to another alg",
                pinned,
                Algorithm::RS384,
                "is for RS256",
            ),
            (
                "an empty set",
                json!({"keys": []}),
                Algorithm::ES256,
                "no private key",
            ),
            (
                "keys not an array",
                json!({"keys": {}}),
                Algorithm::ES256,
                "not an array",
            ),
            ("RSA without its factors", no_crt, Algorithm::RS384, "p, q"),
        ];
        for (what, doc, alg, says) in cases {
            let e = private_key(&doc, alg).map(|_| ()).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{what}: {e:#}");
        }
        // A public point that is not d's: refused when the key is built.
        let (der, _) = private_key(&wrong_d, Algorithm::ES256).expect("DER");
        assert!(
            SigningKey::from_pkcs8(&der, Algorithm::ES256).is_err(),
            "a mismatched EC key"
        );
    }
}
