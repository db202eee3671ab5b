//! Signing in to an etcd with authentication enabled: a user name and password exchanged for a
//! token (etcd's `Auth.Authenticate`), sent as the `token` metadata of every call, and
//! exchanged again when etcd no longer knows it (simple tokens expire after
//! `--auth-token-ttl`, 300 s by default, unused; a token from before a change of users or roles
//! is refused as old). A restarted etcd still knows its tokens: it assigns them again as it
//! replays its log.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grpc_pool_core::metrics as m;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;

use super::proto::auth_client::AuthClient;
use super::proto::AuthenticateRequest;
use super::EtcdError;
use crate::Pool;

/// A token etcd handed out; cheap to clone.
pub(crate) type Token = MetadataValue<Ascii>;

/// A user's name and password, and what signing in last gave.
pub(crate) struct Credentials {
    user: String,
    password: String,
    held: Mutex<Held>,
    /// Held while authenticating, so that callers who find no token wait for one sign-in
    /// instead of each signing in (etcd hashes the password with bcrypt for each).
    signing_in: tokio::sync::Mutex<()>,
}

/// What calls are sent with.
#[derive(Clone, PartialEq)]
enum Held {
    /// Sign in first.
    Nothing,
    Token(Token),
    /// etcd answered that its authentication is off: calls go without a token (as etcd's Go
    /// client does) until one is refused for lacking it.
    AuthOff,
}

impl Credentials {
    pub(crate) fn new(user: &str, password: &str) -> Credentials {
        Credentials {
            user: user.to_owned(),
            password: password.to_owned(),
            held: Mutex::new(Held::Nothing),
            signing_in: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) fn user(&self) -> &str {
        &self.user
    }

    fn held(&self) -> Held {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, held: Held) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = held;
    }

    /// The token to send: the one in hand, a new one from etcd, or none when etcd said its
    /// authentication is off. A sign-in gets no longer than `within` (the client's call
    /// timeout): a connection that silently drops everything must not hold every caller of
    /// the client (they wait for the one sign-in) for longer.
    pub(crate) async fn token(&self, pool: &Pool, within: Duration) -> Result<Option<Token>, EtcdError> {
        match self.held() {
            Held::Token(token) => return Ok(Some(token)),
            Held::AuthOff => return Ok(None),
            Held::Nothing => {}
        }
        let _signing_in = self.signing_in.lock().await;
        // Someone else may have signed in while this caller waited.
        match self.held() {
            Held::Token(token) => return Ok(Some(token)),
            Held::AuthOff => return Ok(None),
            Held::Nothing => {}
        }
        let request = AuthenticateRequest { name: self.user.clone(), password: self.password.clone() };
        let mut client = AuthClient::new(pool.clone());
        let answer = match tokio::time::timeout(within, client.authenticate(request)).await {
            Ok(answer) => answer,
            Err(_) => Err(super::timed_out("authenticate", within)),
        };
        let token = match answer {
            Ok(answer) => answer.into_inner().token,
            Err(status)
                if status.code() == tonic::Code::FailedPrecondition
                    && status.message().contains("authentication is not enabled") =>
            {
                tracing::info!(user = %self.user, "etcd's authentication is off; calls go without a token");
                self.set(Held::AuthOff);
                return Ok(None);
            }
            Err(status) => {
                metrics::counter!(m::ETCD_AUTHENTICATIONS, m::LABEL_RESULT => "error").increment(1);
                tracing::warn!(user = %self.user, code = ?status.code(), error = %status.message(), "etcd authentication failed");
                return Err(EtcdError::call("authenticate", status));
            }
        };
        let Ok(token) = Token::try_from(token.as_str()) else {
            metrics::counter!(m::ETCD_AUTHENTICATIONS, m::LABEL_RESULT => "error").increment(1);
            let status = tonic::Status::internal("etcd's token is not a valid metadata value");
            return Err(EtcdError::call("authenticate", status));
        };
        metrics::counter!(m::ETCD_AUTHENTICATIONS, m::LABEL_RESULT => "ok").increment(1);
        tracing::info!(user = %self.user, "etcd authenticated");
        self.set(Held::Token(token.clone()));
        Ok(Some(token))
    }

    /// Forgets `used` (if it is still what calls are sent with) so that the next call signs
    /// in again; true if `status` says etcd no longer takes it.
    pub(crate) fn rejected(&self, status: &tonic::Status, used: &Option<Token>) -> bool {
        if !token_refused(status.code(), status.message()) {
            return false;
        }
        self.forget(used);
        true
    }

    /// Forgets `used` (a token, or none) if it is still what calls are sent with.
    pub(crate) fn forget(&self, used: &Option<Token>) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let still = match (&*held, used) {
            (Held::Token(token), Some(used)) => token == used,
            (Held::AuthOff, None) => true,
            _ => false,
        };
        if still {
            *held = Held::Nothing;
            tracing::info!(user = %self.user, "etcd no longer takes the token; authenticating again");
        }
    }
}

/// Whether an error from etcd means what the call was sent with is no longer good: a token
/// expired or unknown (`invalid auth token`), issued before the users or roles changed
/// (`revision of auth store is old`), or no token where etcd now wants one (`user name is
/// empty`: authentication was turned on). A wrong password or a missing permission is not.
pub(crate) fn token_refused(code: tonic::Code, message: &str) -> bool {
    matches!(code, tonic::Code::Unauthenticated | tonic::Code::InvalidArgument) && refuses_token(message)
}

/// Whether etcd's message (a status's, or the reason a watch was cancelled) says the token
/// is no longer good.
pub(crate) fn refuses_token(message: &str) -> bool {
    ["invalid auth token", "revision of auth store is old", "user name is empty"]
        .iter()
        .any(|refusal| message.contains(refusal))
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).finish_non_exhaustive()
    }
}

/// Puts the token on a call's metadata (nothing without credentials).
#[derive(Clone)]
pub(crate) struct SendToken(pub(crate) Option<Token>);

impl Interceptor for SendToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request.metadata_mut().insert("token", token.clone());
        }
        Ok(request)
    }
}

/// The credentials a client signs in with, shared by its clones.
pub(crate) type SharedCredentials = Option<Arc<Credentials>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_expired_or_stale_token_is_signed_in_again() {
        assert!(token_refused(tonic::Code::Unauthenticated, "etcdserver: invalid auth token"));
        assert!(token_refused(tonic::Code::InvalidArgument, "etcdserver: revision of auth store is old"));
        assert!(!token_refused(
            tonic::Code::InvalidArgument,
            "etcdserver: authentication failed, invalid user ID or password"
        ));
        assert!(!token_refused(tonic::Code::PermissionDenied, "etcdserver: permission denied"));
        assert!(!token_refused(tonic::Code::Unavailable, "invalid auth token"));
        // How etcd 3.4 cancels a watch created with an expired token.
        assert!(refuses_token("rpc error: code = Unauthenticated desc = etcdserver: invalid auth token"));
        assert!(!refuses_token("etcdserver: permission denied"));
        assert!(token_refused(tonic::Code::InvalidArgument, "etcdserver: user name is empty"));
    }

    #[test]
    fn a_rejected_token_is_forgotten_only_if_it_is_still_in_hand() {
        let credentials = Credentials::new("app", "secret");
        let old = Token::from_static("old.1");
        let new = Token::from_static("new.2");
        credentials.set(Held::Token(new.clone()));
        let expired = tonic::Status::unauthenticated("etcdserver: invalid auth token");
        assert!(credentials.rejected(&expired, &Some(old)));
        assert!(credentials.held() == Held::Token(new.clone()), "a newer token stays");
        assert!(credentials.rejected(&expired, &Some(new)));
        assert!(credentials.held() == Held::Nothing);
        assert!(!format!("{credentials:?}").contains("secret"));
    }

    #[test]
    fn calls_without_a_token_sign_in_once_etcd_wants_one() {
        let credentials = Credentials::new("app", "secret");
        credentials.set(Held::AuthOff);
        let wants_one = tonic::Status::invalid_argument("etcdserver: user name is empty");
        assert!(credentials.rejected(&wants_one, &None));
        assert!(credentials.held() == Held::Nothing);
    }
}
