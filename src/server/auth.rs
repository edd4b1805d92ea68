//! Who may connect, and as what: tokens, roles, and the browser origin and
//! host checks.
//!
//! Secrets are resolved once at start-up (from the config, an environment
//! variable or a file) and compared in constant time. With no token
//! configured every client is an `agent` (the config refuses that on a
//! non-loopback address unless `allow_anonymous` says so), and then the
//! `Host` of an upgrade must be an IP literal, `localhost` or a name in
//! `allowed_hosts`: a page on a DNS-rebinding domain names its own domain in
//! both `Origin` and `Host`, which passes the origin check but not this one.

use crate::config::{AuthConfig, Config, Role, TokenConfig};
use crate::error::HerdError;
use crate::ns::Ns;
use crate::server::logins::Logins;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;

/// The holder of a session's credentials.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The token's name ("anonymous" without tokens; a signed token's
    /// `sub`), for logs and metrics.
    pub name: String,
    pub role: Role,
    /// Which remote fns this session may `serve`.
    pub serve: ServeRight,
    /// The namespace its keys belong to.
    pub ns: Ns,
    /// Namespace `"*"`: its snapshots show every namespace.
    pub sees_all: bool,
    /// The fns it may submit (all when None).
    pub fns: Option<Arc<[String]>>,
    /// A signed token's `exp` plus the leeway (Unix seconds): the session
    /// is closed then.
    pub expires: Option<u64>,
}

impl Identity {
    /// Every client of a broker without credentials.
    pub fn anonymous() -> Identity {
        Identity {
            name: "anonymous".into(),
            role: Role::Agent,
            serve: ServeRight::All,
            ns: Ns::SHARED,
            sees_all: false,
            fns: None,
            expires: None,
        }
    }

    /// Whether it may submit fn `name`.
    pub fn may_submit(&self, name: &str) -> bool {
        self.fns
            .as_ref()
            .is_none_or(|fns| fns.iter().any(|f| f == name))
    }
}

/// Which remote fns a session may serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeRight {
    /// None: agents and viewers when tokens are configured.
    Nothing,
    /// Every remote fn: worker tokens without `fns`, and everyone without tokens.
    All,
    /// The fns a worker token lists.
    Only(Vec<String>),
}

impl ServeRight {
    pub fn allows(&self, fn_name: &str) -> bool {
        match self {
            ServeRight::Nothing => false,
            ServeRight::All => true,
            ServeRight::Only(fns) => fns.iter().any(|f| f == fn_name),
        }
    }
}

struct Credential {
    identity: Identity,
    secret: Vec<u8>,
}

/// The credentials, origins and hosts a broker accepts.
pub struct Gate {
    credentials: Vec<Credential>,
    logins: Logins,
    jwt: Option<Jwt>,
    allowed_origins: Vec<String>,
    allowed_hosts: Vec<String>,
}

/// How signed tokens are checked: the keys, each with the algorithms it
/// verifies, and the claims every token must satisfy.
struct Jwt {
    keys: Vec<(DecodingKey, Vec<Algorithm>)>,
    validation: Validation,
    leeway_s: u64,
    max_namespaces: usize,
}

/// The claims herd reads from a signed token.
#[derive(Deserialize)]
struct Claims {
    role: Role,
    #[serde(default)]
    ns: String,
    #[serde(default)]
    fns: Option<Vec<String>>,
    #[serde(default)]
    sub: Option<String>,
    exp: u64,
}

impl Jwt {
    fn new(auth: &AuthConfig) -> Result<Option<Jwt>, HerdError> {
        if !auth.jwt() {
            return Ok(None);
        }
        let bad = |m: String| HerdError::Config(format!("auth: {m}"));
        let mut keys = Vec::new();
        if let Some(var) = &auth.jwt_secret_env {
            let secret = std::env::var(var).map_err(|_| {
                bad(format!(
                    "environment variable {var} is not set: set it to the signing secret"
                ))
            })?;
            if secret.is_empty() {
                return Err(bad(format!("environment variable {var} is empty")));
            }
            keys.push((
                DecodingKey::from_secret(secret.as_bytes()),
                vec![Algorithm::HS256],
            ));
        }
        if let Some(path) = &auth.jwt_public_key_file {
            let pem = std::fs::read(path)
                .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
            let key = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                (k, vec![Algorithm::RS256])
            } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                (k, vec![Algorithm::ES256])
            } else if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
                (k, vec![Algorithm::EdDSA])
            } else {
                return Err(bad(format!(
                    "{} holds no RSA, EC or Ed25519 public key in PEM",
                    path.display()
                )));
            };
            keys.push(key);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = auth.jwt_leeway_s;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        match &auth.jwt_audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &auth.jwt_issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Some(Jwt {
            keys,
            validation,
            leeway_s: auth.jwt_leeway_s,
            max_namespaces: auth.max_namespaces,
        }))
    }

    /// The identity a signed token carries, if it verifies.
    fn verify(&self, token: &str) -> Option<Identity> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        let (key, _) = self
            .keys
            .iter()
            .find(|(_, algorithms)| algorithms.contains(&header.alg))?;
        let mut validation = self.validation.clone();
        validation.algorithms = vec![header.alg];
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .ok()?
            .claims;
        let sees_all = claims.ns == "*";
        if sees_all && !claims.role.may_span_namespaces() {
            return None;
        }
        let ns = if sees_all {
            Ns::SHARED
        } else {
            Ns::intern(&claims.ns, self.max_namespaces).ok()?
        };
        let name = claims.sub.unwrap_or_else(|| "jwt".into());
        let name = if name.len() <= 128 && name.chars().all(|c| !c.is_control()) {
            name
        } else {
            "jwt".into()
        };
        Some(Identity {
            name,
            role: claims.role,
            serve: serve_right(claims.role, &claims.fns),
            ns,
            sees_all,
            fns: submit_list(claims.role, claims.fns),
            expires: Some(claims.exp.saturating_add(self.leeway_s)),
        })
    }
}

/// What a credential of `role` listing `fns` may serve.
fn serve_right(role: Role, fns: &Option<Vec<String>>) -> ServeRight {
    match (role, fns) {
        (Role::Worker, None) => ServeRight::All,
        (Role::Worker, Some(fns)) => ServeRight::Only(fns.clone()),
        _ => ServeRight::Nothing,
    }
}

/// What a credential of `role` listing `fns` may submit.
fn submit_list(role: Role, fns: Option<Vec<String>>) -> Option<Arc<[String]>> {
    match role {
        Role::Agent | Role::Admin => fns.map(Arc::from),
        Role::Viewer | Role::Worker => None,
    }
}

/// Why a request is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No token, or a wrong one: HTTP 401.
    Unauthorized,
    /// A browser page from another origin: HTTP 403.
    ForeignOrigin,
    /// Without tokens, a `Host` that is not this machine's: HTTP 403.
    ForeignHost,
    /// Too many wrong credentials from the address: HTTP 429, until it
    /// may try again.
    Throttled(Duration),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Unauthorized => StatusCode::UNAUTHORIZED,
            Refusal::ForeignOrigin | Refusal::ForeignHost => StatusCode::FORBIDDEN,
            Refusal::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The error code of an HTTP API answer.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Unauthorized => "unauthorized",
            Refusal::ForeignOrigin | Refusal::ForeignHost => "forbidden",
            Refusal::Throttled(_) => "rate_limited",
        }
    }

    /// What the client of a request to `path` is told.
    pub fn message(&self, path: &str) -> String {
        match self {
            Refusal::Unauthorized => "a valid token is required".into(),
            Refusal::ForeignOrigin => "origin not allowed".into(),
            Refusal::ForeignHost => format!(
                "host not allowed: without tokens, {path} answers only to IP addresses, localhost and allowed_hosts"
            ),
            Refusal::Throttled(wait) => format!(
                "too many wrong credentials from this address (limits.failed_logins_per_min); try again in {} ms",
                wait.as_millis()
            ),
        }
    }

    /// Why, in the broker's log.
    pub fn logged(&self) -> &'static str {
        match self {
            Refusal::Unauthorized => "missing or unknown token",
            Refusal::ForeignOrigin => "origin not allowed",
            Refusal::ForeignHost => "host not allowed",
            Refusal::Throttled(_) => "too many wrong credentials from this address",
        }
    }

    /// When to try again, for a `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Refusal::Throttled(wait) => Some(*wait),
            _ => None,
        }
    }
}

impl Gate {
    /// Resolves every token's secret; fails if one cannot be read or is empty.
    pub fn new(config: &Config) -> Result<Gate, HerdError> {
        let max = config.auth.max_namespaces;
        let credentials = config
            .tokens
            .iter()
            .map(|t| {
                let sees_all = t.namespace == "*";
                let ns = if sees_all {
                    Ns::SHARED
                } else {
                    Ns::intern(&t.namespace, max).map_err(|e| {
                        HerdError::Config(format!("token {:?}: namespace: {e}", t.name))
                    })?
                };
                Ok(Credential {
                    identity: Identity {
                        name: t.name.clone(),
                        role: t.role,
                        serve: serve_right(t.role, &t.fns),
                        ns,
                        sees_all,
                        fns: submit_list(t.role, t.fns.clone()),
                        expires: None,
                    },
                    secret: resolve(t)?.into_bytes(),
                })
            })
            .collect::<Result<_, HerdError>>()?;
        for n in &config.namespaces {
            Ns::intern(&n.name, max)
                .map_err(|e| HerdError::Config(format!("namespace {:?}: {e}", n.name)))?;
        }
        Ok(Gate {
            credentials,
            logins: Logins::new(
                config.limits.failed_logins_per_min,
                config.limits.failed_login_addresses,
            ),
            jwt: Jwt::new(&config.auth)?,
            allowed_origins: config
                .allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            allowed_hosts: config
                .allowed_hosts
                .iter()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
        })
    }

    /// Checks a `/metrics` request: on a broker without tokens, its `Host`
    /// (as for `/ws`, against DNS rebinding); with tokens and `need_token`,
    /// its credentials.
    pub fn admit_metrics(
        &self,
        headers: &HeaderMap,
        uri: &Uri,
        need_token: bool,
        peer: IpAddr,
    ) -> Result<(), Refusal> {
        if !self.has_tokens() {
            return self.check_host(headers);
        }
        if need_token {
            self.identify(headers, uri, peer)?;
        }
        Ok(())
    }

    /// Checks the origin and credentials of a request from `peer`.
    pub fn admit(&self, headers: &HeaderMap, uri: &Uri, peer: IpAddr) -> Result<Identity, Refusal> {
        self.check_origin(headers)?;
        if !self.has_tokens() {
            self.check_host(headers)?;
            return Ok(Identity::anonymous());
        }
        self.identify(headers, uri, peer)
    }

    /// Whether credentials (tokens or signed tokens) are configured at all.
    pub fn has_tokens(&self) -> bool {
        !self.credentials.is_empty() || self.jwt.is_some()
    }

    /// The holder of the token a request from `peer` presents (bearer
    /// header or `?token=`), whatever its origin. A wrong one counts
    /// against `peer`'s failed logins.
    fn identify(&self, headers: &HeaderMap, uri: &Uri, peer: IpAddr) -> Result<Identity, Refusal> {
        let presented = bearer(headers)
            .or_else(|| query_token(uri))
            .ok_or(Refusal::Unauthorized)?;
        if let Some(wait) = self.logins.refused(peer) {
            return Err(Refusal::Throttled(wait));
        }
        let identity = self.verify(&presented);
        if identity.is_err() {
            if let Some(wait) = self.logins.failed(peer) {
                return Err(Refusal::Throttled(wait));
            }
        }
        identity
    }

    /// The holder of token `presented`.
    fn verify(&self, presented: &str) -> Result<Identity, Refusal> {
        if let Some(jwt) = &self.jwt {
            // A JWT is three base64url parts joined by dots; a static secret
            // may look like one, so a token that does not verify is still
            // compared with the secrets.
            if presented.split('.').count() == 3 {
                if let Some(identity) = jwt.verify(presented) {
                    return Ok(identity);
                }
            }
        }
        // Compare with every credential so the time taken does not tell which matched.
        let mut found = None;
        for c in &self.credentials {
            if bool::from(c.secret.as_slice().ct_eq(presented.as_bytes())) {
                found = Some(c);
            }
        }
        found
            .map(|c| c.identity.clone())
            .ok_or(Refusal::Unauthorized)
    }

    fn check_origin(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
            return Ok(());
        };
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if self.allowed_origins.contains(&origin) {
            return Ok(());
        }
        let origin_host = origin.split_once("://").map(|(_, h)| h);
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_ascii_lowercase);
        match (origin_host, host) {
            (Some(o), Some(h)) if o == h => Ok(()),
            _ => Err(Refusal::ForeignOrigin),
        }
    }
}

impl Gate {
    /// Accepts a missing `Host` (not a browser), IP literals, `localhost`
    /// and its subdomains, and the names in `allowed_hosts`.
    fn check_host(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let Some(host) = headers.get(header::HOST) else {
            return Ok(());
        };
        let host = host.to_str().map_err(|_| Refusal::ForeignHost)?;
        let name = host_name(host).trim_end_matches('.').to_ascii_lowercase();
        let allowed = name.parse::<std::net::IpAddr>().is_ok()
            || name == "localhost"
            || name.ends_with(".localhost")
            || self.allowed_hosts.contains(&name);
        if allowed {
            Ok(())
        } else {
            Err(Refusal::ForeignHost)
        }
    }
}

/// The name in a `Host` value, without its port or IPv6 brackets.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn resolve(t: &TokenConfig) -> Result<String, HerdError> {
    let bad = |m: String| HerdError::Config(format!("token {:?}: {m}", t.name));
    let secret = if let Some(s) = &t.secret {
        s.clone()
    } else if let Some(var) = &t.secret_env {
        std::env::var(var).map_err(|_| {
            bad(format!(
                "environment variable {var} is not set: set it to this token's secret"
            ))
        })?
    } else if let Some(path) = &t.secret_file {
        std::fs::read_to_string(path)
            .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?
            .trim()
            .to_string()
    } else {
        return Err(bad("no secret".into()));
    };
    if secret.is_empty() {
        return Err(bad("the secret is empty".into()));
    }
    Ok(secret)
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

fn query_token(uri: &Uri) -> Option<String> {
    form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn gate(toml: &str) -> Gate {
        Gate::new(&Config::from_toml(toml).unwrap()).unwrap()
    }

    const TOKENS: &str = "[[token]]\nname = \"a\"\nrole = \"agent\"\nsecret = \"s3cret\"\n[[token]]\nname = \"v\"\nrole = \"viewer\"\nsecret = \"look\"\n";

    #[test]
    fn bearer_and_query_tokens() {
        let g = gate(TOKENS);
        let mut h = HeaderMap::new();
        let uri: Uri = "/ws".parse().unwrap();
        assert_eq!(g.admit(&h, &uri, PEER).unwrap_err(), Refusal::Unauthorized);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret"),
        );
        let id = g.admit(&h, &uri, PEER).unwrap();
        assert_eq!((id.name.as_str(), id.role), ("a", Role::Agent));
        let uri: Uri = "/ws?x=1&token=look".parse().unwrap();
        let id = g.admit(&HeaderMap::new(), &uri, PEER).unwrap();
        assert_eq!(id.role, Role::Viewer);
        let uri: Uri = "/ws?token=nope".parse().unwrap();
        assert!(g.admit(&HeaderMap::new(), &uri, PEER).is_err());
    }

    #[test]
    fn origins() {
        let g = gate("allowed_origins = [\"https://dash.example.com\"]");
        let uri: Uri = "/ws".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:7878"));
        assert!(g.admit(&h, &uri, PEER).is_ok(), "no Origin: not a browser");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:7878"),
        );
        assert!(g.admit(&h, &uri, PEER).is_ok(), "same host");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://dash.example.com"),
        );
        assert!(g.admit(&h, &uri, PEER).is_ok(), "allowed");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert_eq!(g.admit(&h, &uri, PEER).unwrap_err(), Refusal::ForeignOrigin);
    }

    #[test]
    fn secrets_from_env_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "from-file\n").unwrap();
        std::env::set_var("HERD_TEST_SECRET", "from-env");
        let g = gate(&format!(
            "[[token]]\nname = \"e\"\nrole = \"agent\"\nsecret_env = \"HERD_TEST_SECRET\"\n[[token]]\nname = \"f\"\nrole = \"viewer\"\nsecret_file = {:?}\n",
            file.display().to_string()
        ));
        let mut h = HeaderMap::new();
        let uri: Uri = "/ws".parse().unwrap();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer from-file"),
        );
        assert_eq!(g.admit(&h, &uri, PEER).unwrap().name, "f");
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer from-env"),
        );
        assert_eq!(g.admit(&h, &uri, PEER).unwrap().name, "e");
        let missing = Config::from_toml(
            "[[token]]\nname = \"m\"\nrole = \"agent\"\nsecret_env = \"HERD_NO_SUCH_VAR\"\n",
        )
        .unwrap();
        assert!(Gate::new(&missing).is_err());
    }
}
