//! Human-readable durations in config files: `"500ms"`, `"2s"`, `"30d"`.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A duration written as a string with a unit, parsed by `humantime`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;

        impl Visitor<'_> for DurationVisitor {
            type Value = ConfigDuration;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration string with a unit, such as \"500ms\", \"2s\" or \"30d\"")
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<ConfigDuration, E> {
                humantime::parse_duration(value)
                    .map(ConfigDuration)
                    .map_err(|err| {
                        E::custom(format!(
                            "invalid duration {value:?}: {err}; write a number with a unit, such as \"500ms\", \"2s\" or \"30d\""
                        ))
                    })
            }
        }

        deserializer.deserialize_str(DurationVisitor)
    }
}

/// Formats a duration the way the config file spells it, for messages and status output.
pub fn format_duration(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}
