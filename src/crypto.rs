//! Keys, digests and randomness: the cryptography every layer shares, as a leaf.
//!
//! Owns: [`SigningKey`] (PKCS#8 PEM, JWK or JWK Set load ([`jwk`]), generation, JWS signing, the public JWK), the
//! digest that names a token in logs and cache keys ([`token_id`]) and [`random`], which takes
//! the operating system's generator directly (no per-thread seeding on the request path), and
//! the library's generator only if that fails. Must not know what the keys, digests or values
//! are for.

use anyhow::{Context, bail};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
};
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde_json::{Value, json};
use sha2::Digest;
use std::path::Path;

mod jwk;

/// A stable, non-reversible id of a token (or any text) for logs and cache keys.
pub fn token_id(token: &str) -> String {
    let d = sha2::Sha256::digest(token.as_bytes());
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Fills `buf` with random bytes; `false` only when no generator answered.
pub(crate) fn random(buf: &mut [u8]) -> bool {
    getrandom::fill(buf).is_ok() || aws_lc_rs::rand::fill(buf).is_ok()
}

const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// A private signing key (RSA or EC, PKCS#8) and its public JWK.
pub struct SigningKey {
    pub alg: Algorithm,
    pub kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    public_jwk: Value,
    pkcs8_pem: String,
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn pem_der(text: &str) -> anyhow::Result<Vec<u8>> {
    let body: String = text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .context("the key file is not PEM")
}

impl SigningKey {
    /// Generates a fresh key for `alg` (ES256, ES384, RS256 or PS256 and the other RSA algorithms).
    pub fn generate(alg: Algorithm) -> anyhow::Result<SigningKey> {
        let rng = SystemRandom::new();
        let der: Vec<u8> = match alg {
            Algorithm::ES256 => {
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(|_| anyhow::anyhow!("EC key generation failed"))?
                    .as_ref()
                    .to_vec()
            }
            Algorithm::ES384 => {
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng)
                    .map_err(|_| anyhow::anyhow!("EC key generation failed"))?
                    .as_ref()
                    .to_vec()
            }
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => {
                let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                    .map_err(|_| anyhow::anyhow!("RSA key generation failed"))?;
                kp.as_der()
                    .map_err(|_| anyhow::anyhow!("RSA key encoding failed"))?
                    .as_ref()
                    .to_vec()
            }
            other => bail!("keys sign with ES256, ES384, RS* or PS*, not {other:?}"),
        };
        SigningKey::from_pkcs8(&der, alg)
    }

    /// Builds the key from PKCS#8 DER.
    pub(crate) fn from_pkcs8(der: &[u8], alg: Algorithm) -> anyhow::Result<SigningKey> {
        let pkcs8_pem = pem("PRIVATE KEY", der);
        let (encoding, public_jwk) = match alg {
            Algorithm::ES256 | Algorithm::ES384 => {
                let (sig_alg, crv) = if alg == Algorithm::ES256 {
                    (&ECDSA_P256_SHA256_FIXED_SIGNING, "P-256")
                } else {
                    (&ECDSA_P384_SHA384_FIXED_SIGNING, "P-384")
                };
                let kp = EcdsaKeyPair::from_pkcs8(sig_alg, der)
                    .map_err(|_| anyhow::anyhow!("not an EC {crv} PKCS#8 key"))?;
                let point = kp.public_key().as_ref();
                let n = (point.len() - 1) / 2;
                let jwk = json!({
                    "kty": "EC", "crv": crv,
                    "x": B64URL.encode(&point[1..1 + n]),
                    "y": B64URL.encode(&point[1 + n..]),
                });
                (EncodingKey::from_ec_pem(pkcs8_pem.as_bytes())?, jwk)
            }
            _ => {
                let kp = aws_lc_rs::rsa::KeyPair::from_pkcs8(der)
                    .map_err(|_| anyhow::anyhow!("not an RSA PKCS#8 key"))?;
                let pk = kp.public_key();
                let jwk = json!({
                    "kty": "RSA",
                    "n": B64URL.encode(pk.modulus().big_endian_without_leading_zero()),
                    "e": B64URL.encode(pk.exponent().big_endian_without_leading_zero()),
                });
                (EncodingKey::from_rsa_pem(pkcs8_pem.as_bytes())?, jwk)
            }
        };
        // The kid is a thumbprint-like digest of the public key, so it changes when the key does.
        let kid = token_id(&public_jwk.to_string());
        let mut public_jwk = public_jwk;
        public_jwk["kid"] = json!(kid);
        public_jwk["use"] = json!("sig");
        public_jwk["alg"] = json!(format!("{alg:?}"));
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(public_jwk.clone())?;
        let decoding = DecodingKey::from_jwk(&jwk)?;
        Ok(SigningKey {
            alg,
            kid,
            encoding,
            decoding,
            public_jwk,
            pkcs8_pem,
        })
    }

    /// Loads a PKCS#8 PEM key written by [`SigningKey::save`] (or by openssl).
    /// A PKCS#8 PEM file, or a JWK or JWK Set (JSON) holding the private key (as SMART
    /// Backend Services registrations hand them out); a JWK's `kid` is kept, so the assertions
    /// it signs name the key the registration published.
    pub fn load(path: &Path, alg: Algorithm) -> anyhow::Result<SigningKey> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read key file {}", path.display()))?;
        let key = if text.trim_start().starts_with('{') {
            let doc: Value = serde_json::from_str(&text)
                .with_context(|| format!("key file {} is neither PEM nor JSON", path.display()))?;
            let (der, kid) = jwk::private_key(&doc, alg)?;
            let mut k = SigningKey::from_pkcs8(&der, alg)?;
            if let Some(kid) = kid {
                k.public_jwk["kid"] = json!(kid);
                k.kid = kid;
            }
            Ok(k)
        } else {
            SigningKey::from_pkcs8(&pem_der(&text)?, alg)
        };
        key.with_context(|| format!("key file {} does not hold a {alg:?} key", path.display()))
    }

    /// Loads a PKCS#8 PEM key for the first of `algs` it serves.
    pub(crate) fn load_any(path: &Path, algs: &[Algorithm]) -> anyhow::Result<SigningKey> {
        // A JWK Set's first usable key wins, whatever its type: try its algorithm first.
        let first = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|doc| jwk::first_usable(&doc, algs));
        let ordered: Vec<Algorithm> = first
            .into_iter()
            .chain(algs.iter().copied().filter(|a| Some(*a) != first))
            .collect();
        let mut why = Vec::new();
        for a in &ordered {
            match SigningKey::load(path, *a) {
                Ok(k) => return Ok(k),
                Err(e) => why.push(format!("{a:?}: {}", e.root_cause())),
            }
        }
        bail!(
            "{} holds no private key for {} ({})",
            path.display(),
            algs.iter()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
                .join(" or "),
            why.join("; ")
        )
    }

    /// Loads the key file if it exists, otherwise generates one and writes it there.
    pub fn load_or_create(path: &Path, alg: Algorithm) -> anyhow::Result<SigningKey> {
        if path.exists() {
            return SigningKey::load(path, alg);
        }
        let k = SigningKey::generate(alg)?;
        // Two processes started together (an issuer and a mint) must not both create a key,
        // each keeping its own: the file appears whole, once, and whoever comes second loads it.
        match k.save_new(path) {
            Ok(()) => Ok(k),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => SigningKey::load(path, alg),
            Err(e) => Err(e).with_context(|| format!("cannot write key file {}", path.display())),
        }
    }

    /// Writes the key to `path` unless it exists: whole (written beside it, then linked into
    /// place) and readable by its owner only.
    pub(crate) fn save_new(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let mut salt = [0u8; 8];
        random(&mut salt);
        let salt: String = salt.iter().map(|b| format!("{b:02x}")).collect();
        let tmp = dir
            .unwrap_or(Path::new("."))
            .join(format!(".{}.{salt}.tmp", name.unwrap_or_default()));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let written = opts
            .open(&tmp)
            .and_then(|mut f| f.write_all(self.pkcs8_pem.as_bytes()).and(f.sync_all()));
        let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
        let _ = std::fs::remove_file(&tmp);
        linked
    }

    /// The public half, for verifying what this key signed.
    pub(crate) fn decoding(&self) -> &DecodingKey {
        &self.decoding
    }

    pub(crate) fn public_jwk(&self) -> &Value {
        &self.public_jwk
    }

    /// Signs claims as an RFC 9068 access token (`typ: at+jwt`).
    pub(crate) fn sign(&self, claims: &Value) -> anyhow::Result<String> {
        self.sign_with_typ(claims, Some("at+jwt"))
    }

    pub(crate) fn sign_with_typ(
        &self,
        claims: &Value,
        typ: Option<&str>,
    ) -> anyhow::Result<String> {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        h.typ = typ.map(str::to_string);
        Ok(jsonwebtoken::encode(&h, claims, &self.encoding)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn a_key_file_is_created_once_whole_and_private() {
        let dir = std::env::temp_dir().join(format!("pacsgate-keyrace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for round in 0..20 {
            let path = dir.join(format!("k{round}.pem"));
            let kids: Vec<String> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..4)
                    .map(|_| {
                        s.spawn(|| {
                            SigningKey::load_or_create(&path, Algorithm::ES256)
                                .expect("load or create")
                                .kid
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().expect("thread")).collect()
            });
            assert!(
                kids.iter().all(|k| *k == kids[0]),
                "round {round}: {kids:?}"
            );
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
                assert_eq!(
                    mode & 0o077,
                    0,
                    "a private key readable by others: {mode:o}"
                );
            }
        }
        let left: Vec<_> = std::fs::read_dir(&dir)
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn values_differ() {
        let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
        assert!(super::random(&mut a) && super::random(&mut b));
        assert_ne!(a, b);
    }
}
