//! `google.protobuf.Timestamp` with the proto3 JSON mapping's form for
//! generated output: RFC 3339 in UTC, written with `Z`, with 0, 3, 6 or 9
//! fractional digits (`2026-11-29T19:51:37.892259990Z`), as grpcurl and
//! protobuf's own implementations print it. pbjson-types' Timestamp writes
//! `+00:00` instead of `Z`. Reading takes any RFC 3339 offset, as the
//! mapping asks.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::Visitor;
use serde::ser::Error as _;

/// A point in time: seconds and nanoseconds since the Unix epoch, as
/// `google.protobuf.Timestamp` (same fields, same wire format).
#[derive(Clone, Copy, PartialEq, Eq, Hash, ::prost::Message)]
pub struct Timestamp {
    /// Seconds since 1970-01-01T00:00:00Z.
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    /// Nanoseconds within the second, 0 to 999,999,999.
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl Timestamp {
    /// The time as chrono sees it; `None` outside what it holds, or with
    /// nanos out of range.
    fn to_datetime(self) -> Option<DateTime<Utc>> {
        u32::try_from(self.nanos)
            .ok()
            .filter(|n| *n < 1_000_000_000)
            .and_then(|n| DateTime::from_timestamp(self.seconds, n))
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let t = self
            .to_datetime()
            .ok_or_else(|| S::Error::custom(format!("not a valid timestamp: {self:?}")))?;
        serializer.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }
}

struct TimestampVisitor;

impl Visitor<'_> for TimestampVisitor {
    type Value = Timestamp;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an RFC 3339 date and time")
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Timestamp, E> {
        let t = DateTime::parse_from_rfc3339(s).map_err(E::custom)?.with_timezone(&Utc);
        Ok(Timestamp {
            seconds: t.timestamp(),
            nanos: t.timestamp_subsec_nanos() as i32,
        })
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(TimestampVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::Timestamp;

    fn json(seconds: i64, nanos: i32) -> String {
        serde_json::to_string(&Timestamp { seconds, nanos }).unwrap()
    }

    #[test]
    fn written_in_utc_with_z_and_0_3_6_or_9_fractional_digits() {
        assert_eq!(json(0, 0), r#""1970-01-01T00:00:00Z""#);
        assert_eq!(json(1_764_007_200, 250_000_000), r#""2025-11-24T18:00:00.250Z""#);
        assert_eq!(json(1_764_007_200, 250_001_000), r#""2025-11-24T18:00:00.250001Z""#);
        assert_eq!(json(1_764_007_200, 1), r#""2025-11-24T18:00:00.000000001Z""#);
        assert_eq!(json(-1, 0), r#""1969-12-31T23:59:59Z""#);
        assert!(serde_json::to_string(&Timestamp { seconds: 0, nanos: -1 }).is_err());
        assert!(serde_json::to_string(&Timestamp {
            seconds: 0,
            nanos: 1_000_000_000
        })
        .is_err());
    }

    #[test]
    fn read_with_any_offset_and_back_to_the_same_instant() {
        let read = |s: &str| serde_json::from_str::<Timestamp>(s).unwrap();
        let t = Timestamp {
            seconds: 1_764_007_200,
            nanos: 250_000_000,
        };
        assert_eq!(read(r#""2025-11-24T18:00:00.250Z""#), t);
        assert_eq!(read(r#""2025-11-24T18:00:00.250+00:00""#), t);
        assert_eq!(read(r#""2025-11-24T19:00:00.25+01:00""#), t);
        assert!(serde_json::from_str::<Timestamp>(r#""yesterday""#).is_err());
        assert!(serde_json::from_str::<Timestamp>("12").is_err());
    }
}
