//! `tether check-config`: the effective configuration as TOML that `--config` accepts,
//! with every secret replaced by `<redacted>` so the output can go into a CI log.
//!
//! Secrets are `identity.secret`, `admin.token` and the password of any broker URL
//! (`redis://user:password@host`, `amqp://user:password@host`).

use tether_actors::settings::Settings;

/// What a secret is shown as.
pub const REDACTED: &str = "<redacted>";

/// The configuration as TOML, secrets redacted.
pub fn effective_toml(settings: &Settings) -> String {
    let mut shown = settings.clone();
    if shown.identity.secret.is_some() {
        shown.identity.secret = Some(REDACTED.into());
    }
    if shown.admin.token.is_some() {
        shown.admin.token = Some(REDACTED.into());
    }
    shown.events.redis.url = redact_url_password(&shown.events.redis.url);
    shown.events.rabbitmq.url = redact_url_password(&shown.events.rabbitmq.url);
    shown.storage.url = redact_url_password(&shown.storage.url);
    let body = toml::to_string(&shown).expect("settings are plain TOML values");
    format!(
        "# Tether's effective configuration (embedded default, file, environment).\n\
         # Secrets are shown as \"{REDACTED}\": put the real values back (or set them in the\n\
         # environment) before using this file with --config.\n\n{body}"
    )
}

/// `url` with its password (if any) shown as [`REDACTED`].
pub fn redact_url_password(url: &str) -> String {
    tether_actors::publisher::broker::mask_url_password(url, REDACTED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_redacted_and_the_rest_kept() {
        assert_eq!(
            redact_url_password("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
            "amqp://guest:<redacted>@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url_password("redis://:p@ss@host:6379/0"),
            "redis://:<redacted>@host:6379/0"
        );
        for plain in ["redis://127.0.0.1:6379", "redis://user@host", "not a url"] {
            assert_eq!(redact_url_password(plain), plain);
        }
    }

    #[test]
    fn the_printed_configuration_loads_again_and_shows_no_secret() {
        let mut settings = crate::config::load(None).unwrap();
        settings.identity.secret = Some("hunter2-identity".into());
        settings.admin.token = Some("hunter2-token".into());
        settings.events.rabbitmq.url = "amqp://guest:hunter2-amqp@127.0.0.1:5672/%2f".into();
        let printed = effective_toml(&settings);
        assert!(!printed.contains("hunter2"), "{printed}");
        let again: Settings = toml::from_str(&printed).expect("the output is valid settings");
        assert_eq!(again.identity.secret.as_deref(), Some(REDACTED));
        assert_eq!(again.network.port, settings.network.port);
        assert_eq!(again.events.publishers, settings.events.publishers);
    }
}
