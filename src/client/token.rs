//! `herd token`: signs a token (JWT, HS256) with the secret a broker's
//! `[auth] jwt_secret_env` names, for scripts and for trying namespaces
//! out; tokens for production come from the operator's own issuer.

use crate::config::Role;
use clap::Args;
use serde::Serialize;

#[derive(Args, Clone, Debug)]
pub struct TokenArgs {
    /// The environment variable holding the HS256 secret (the broker's
    /// `[auth] jwt_secret_env`).
    #[arg(long, default_value = "HERD_JWT_SECRET")]
    pub secret_env: String,
    /// The role: agent, admin, viewer or worker.
    #[arg(long, default_value = "agent")]
    pub role: String,
    /// The namespace (`""`, the shared one, by default; `*` for an
    /// operator's viewer).
    #[arg(long, default_value = "")]
    pub ns: String,
    /// The fns it may submit (agent, admin) or serve (worker); all when absent.
    #[arg(long = "fn")]
    pub fns: Vec<String>,
    /// The session's name in logs and on the page.
    #[arg(long)]
    pub sub: Option<String>,
    /// Seconds until it expires.
    #[arg(long, default_value_t = 3600)]
    pub ttl_s: u64,
    /// `aud`, for a broker with `[auth] jwt_audience`.
    #[arg(long)]
    pub aud: Option<String>,
    /// `iss`, for a broker with `[auth] jwt_issuer`.
    #[arg(long)]
    pub iss: Option<String>,
}

#[derive(Serialize)]
struct Claims<'a> {
    role: Role,
    ns: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    fns: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<&'a str>,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
}

/// The signed token `args` describe, or why there is none.
pub fn mint(args: &TokenArgs) -> Result<String, String> {
    let secret = std::env::var(&args.secret_env)
        .map_err(|_| format!("environment variable {} is not set", args.secret_env))?;
    if secret.is_empty() {
        return Err(format!("environment variable {} is empty", args.secret_env));
    }
    let role: Role =
        serde_json::from_value(serde_json::Value::String(args.role.clone())).map_err(|_| {
            format!(
                "unknown role {:?}: agent, admin, viewer or worker",
                args.role
            )
        })?;
    if args.ns != "*" && !crate::ns::valid_name(&args.ns) {
        return Err(format!(
            "namespace {:?}: {}",
            args.ns,
            crate::ns::Refused::BadName
        ));
    }
    let now = crate::protocol::unix_ms() / 1000;
    let claims = Claims {
        role,
        ns: &args.ns,
        fns: (!args.fns.is_empty()).then_some(args.fns.as_slice()),
        sub: args.sub.as_deref(),
        iat: now,
        exp: now.saturating_add(args.ttl_s),
        aud: args.aud.as_deref(),
        iss: args.iss.as_deref(),
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| format!("cannot sign: {e}"))
}
