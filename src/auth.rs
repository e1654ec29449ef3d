//! Passwords, JWTs and API keys.
//!
//! Passwords are hashed with argon2id. JWTs are HS256 only: the algorithm is pinned when
//! verifying, so a token signed another way (or `none`) is rejected. API keys and refresh
//! tokens are stored only as SHA-256 hashes and compared in constant time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::config::AuthConfig;

/// The start of every API key, so that leaked keys are easy to recognise and scan for.
pub const API_KEY_PREFIX: &str = "lp_";

/// Characters of a key kept for display (`lp_` plus the first eight of the secret).
const DISPLAY_PREFIX_LEN: usize = 11;

/// Hashes a password with argon2id and a random salt, returning the PHC string.
/// Slow by design: call it off the async worker threads.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    let hash = Argon2::default().hash_password(password.as_bytes(), &salt)?;
    Ok(hash.to_string())
}

/// Checks a password against a PHC string. An unreadable hash counts as a mismatch.
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(hash) => Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok(),
        Err(_) => false,
    }
}

/// SHA-256 of a secret (an API key or a refresh token), as stored in the database.
pub fn sha256(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Compares two hashes in constant time.
pub fn hashes_equal(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// A newly generated API key: the secret shown once, and what the database keeps.
pub struct NewApiKey {
    pub secret: String,
    pub prefix: String,
    pub hash: Vec<u8>,
}

/// Generates an API key of 32 random bytes (256 bits).
pub fn generate_api_key() -> NewApiKey {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let secret = format!("{API_KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    NewApiKey {
        prefix: secret[..DISPLAY_PREFIX_LEN].to_string(),
        hash: sha256(&secret),
        secret,
    }
}

/// The two kinds of JWT; each is accepted only where its kind is expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenType {
    Access,
    Refresh,
}

/// The claims of both token kinds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id, as a string as RFC 7519 requires.
    pub sub: String,
    pub exp: u64,
    pub iat: u64,
    pub jti: Uuid,
    pub typ: TokenType,
}

impl Claims {
    /// Returns the user id in `sub`, if it is one.
    pub fn user_id(&self) -> Option<i64> {
        self.sub.parse().ok()
    }
}

/// A signed token and the claims it carries.
pub struct IssuedToken {
    pub token: String,
    pub claims: Claims,
}

/// Failure to accept a token. The client only ever sees a generic "invalid token" error.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("invalid or expired token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("token is a {0:?} token")]
    WrongType(TokenType),
    #[error("cannot sign token: {0}")]
    Sign(jsonwebtoken::errors::Error),
}

/// Signs and verifies the JWTs with one HS256 secret.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    access_ttl: Duration,
    refresh_ttl: Duration,
}

impl TokenKeys {
    /// Builds the keys from the configured secret, or from `fallback` when none is set.
    pub fn new(config: &AuthConfig, fallback: &[u8]) -> Self {
        let secret = if config.jwt_secret.is_empty() {
            fallback
        } else {
            config.jwt_secret.as_bytes()
        };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub", "iat"]);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            access_ttl: Duration::from_secs(config.access_token_ttl_secs),
            refresh_ttl: Duration::from_secs(config.refresh_token_ttl_secs),
        }
    }

    /// Generates a random secret for a process started without `auth.jwt_secret`.
    pub fn random_secret() -> Vec<u8> {
        let mut secret = vec![0u8; 64];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        secret
    }

    /// Signs a token of kind `typ` for `user_id`.
    pub fn issue(&self, user_id: i64, typ: TokenType) -> Result<IssuedToken, TokenError> {
        let ttl = match typ {
            TokenType::Access => self.access_ttl,
            TokenType::Refresh => self.refresh_ttl,
        };
        let now = unix_now();
        let claims = Claims {
            sub: user_id.to_string(),
            iat: now,
            exp: now + ttl.as_secs(),
            jti: Uuid::now_v7(),
            typ,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(TokenError::Sign)?;
        Ok(IssuedToken { token, claims })
    }

    /// Verifies signature, algorithm, expiry and kind.
    pub fn verify(&self, token: &str, expected: TokenType) -> Result<Claims, TokenError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)?;
        if data.claims.typ != expected {
            return Err(TokenError::WrongType(data.claims.typ));
        }
        Ok(data.claims)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> TokenKeys {
        let config = AuthConfig {
            jwt_secret: "0123456789abcdef0123456789abcdef".into(),
            ..AuthConfig::default()
        };
        TokenKeys::new(&config, b"unused")
    }

    #[test]
    fn password_hash_is_argon2id() {
        let phc = hash_password("correct horse battery").expect("hash");
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        assert!(verify_password("correct horse battery", &phc));
        assert!(!verify_password("correct horse battery!", &phc));
    }

    #[test]
    fn garbage_hash_never_verifies() {
        assert!(!verify_password("anything", "not a phc string"));
    }

    #[test]
    fn api_key_shape_and_hash() {
        let key = generate_api_key();
        assert!(key.secret.starts_with(API_KEY_PREFIX));
        assert_eq!(key.secret.len(), 3 + 43);
        assert!(key.secret.starts_with(&key.prefix));
        assert_eq!(key.hash, sha256(&key.secret));
        assert_ne!(generate_api_key().secret, key.secret);
    }

    #[test]
    fn token_round_trip() {
        let keys = keys();
        let issued = keys.issue(42, TokenType::Access).expect("issue");
        let claims = keys
            .verify(&issued.token, TokenType::Access)
            .expect("verify");
        assert_eq!(claims.user_id(), Some(42));
        assert_eq!(claims.jti, issued.claims.jti);
    }

    #[test]
    fn token_wrong_type_rejected() {
        let keys = keys();
        let refresh = keys.issue(1, TokenType::Refresh).expect("issue");
        let result = keys.verify(&refresh.token, TokenType::Access);
        assert!(matches!(
            result,
            Err(TokenError::WrongType(TokenType::Refresh))
        ));
    }

    #[test]
    fn token_other_secret_rejected() {
        let issued = keys().issue(1, TokenType::Access).expect("issue");
        let other = TokenKeys::new(&AuthConfig::default(), b"another secret entirely");
        assert!(other.verify(&issued.token, TokenType::Access).is_err());
    }

    #[test]
    fn token_alg_none_rejected() {
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let claims = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"sub":"1","exp":{},"iat":1,"jti":"{}","typ":"access"}}"#,
            unix_now() + 600,
            Uuid::now_v7()
        ));
        let token = format!("{header}.{claims}.");
        assert!(keys().verify(&token, TokenType::Access).is_err());
    }
}
