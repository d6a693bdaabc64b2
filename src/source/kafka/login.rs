//! Saying why a Kafka connection failed: a rejected SASL login or a broker certificate that does
//! not verify.
//!
//! librdkafka hands the application only an error code for these (`_AUTHENTICATION`,
//! `_TRANSPORT`, `_SSL`); the reason ("SASL SCRAM authentication failed: …", "certificate verify
//! failed: …") comes as a `FAIL` log line. [`LastFailure`] keeps the latest such line of a client
//! (its context's `log` records it), and [`login_failure`] turns a rejected login into one error
//! naming the brokers, the security protocol, the SASL mechanism and the user. No password is
//! ever part of it: the text is built from non-secret properties and librdkafka's reason, and
//! passes through the properties' redactor anyway.

use std::sync::Mutex;

use rdkafka::config::RDKafkaLogLevel;

use crate::secret::{Redactor, SecretMap};

/// The latest connection-failure reason librdkafka logged for one client.
#[derive(Debug, Default)]
pub struct LastFailure(Mutex<Option<String>>);

impl LastFailure {
    /// Keeps `message` if it is a broker connection failure (facility `FAIL`, warning or worse).
    pub fn record(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        if facility == "FAIL" && (level as i32) <= RDKafkaLogLevel::Warning as i32 {
            let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
            *last = Some(message.to_owned());
        }
    }

    /// The latest reason, if any.
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Whether librdkafka's reason says the broker rejected the SASL login.
pub fn is_login_failure(reason: &str) -> bool {
    reason.contains("SASL authentication error") || reason.contains("Authentication failed")
}

/// `Kafka authentication failed at BROKERS (SASL_SSL, SASL mechanism M, user "u"): REASON; …`,
/// with every secret of `props` scrubbed.
pub fn login_failure(props: &SecretMap, reason: &str, redactor: &Redactor) -> String {
    let get = |key: &str| props.get(key).unwrap_or("(not set)");
    let mechanism = props
        .get("sasl.mechanisms")
        .or(props.get("sasl.mechanism"))
        .unwrap_or("GSSAPI (librdkafka's default)");
    let text = format!(
        "Kafka authentication failed at {} ({}, SASL mechanism {mechanism}, user {:?}): {reason}; \
         check sasl.username and sasl.password (and that the broker offers {mechanism})",
        get("bootstrap.servers"),
        get("security.protocol"),
        get("sasl.username"),
    );
    redactor.redact(&text).into_owned()
}

/// A connection failure that is not a login (e.g. the certificate): the brokers and the reason.
pub fn connection_failure(props: &SecretMap, reason: &str, redactor: &Redactor) -> String {
    let text = format!(
        "cannot connect to Kafka at {} ({}): {reason}",
        props.get("bootstrap.servers").unwrap_or("(not set)"),
        props.get("security.protocol").unwrap_or("PLAINTEXT"),
    );
    redactor.redact(&text).into_owned()
}

/// Forwards a librdkafka log line to `tracing`, as rdkafka's default `ClientContext::log` does
/// through the `log` crate.
pub fn forward_log(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
        RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
        RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
    }
}
