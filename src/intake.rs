//! Intake: turns an `AuthorizeRequest` into a [`NewRequest`], or into the field violations of an
//! `INVALID_ARGUMENT`. Nothing here touches the queue; a rejected request changes nothing.

use url::Url;

use crate::{
    decision::{Micros, NewDecision},
    proto,
    queue::EnqueueOutcome,
    token::{DriverToken, Fingerprint, Fingerprinter},
};

/// Most bytes a `callback_url` may have.
pub const MAX_CALLBACK_URL_LEN: usize = 2048;
/// Most characters a `request_id` may have.
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// Most bytes of a driver token the server holds on to; longer ones are decided INVALID anyway.
const MAX_HELD_TOKEN_LEN: usize = 1024;

/// One bad field: its name and a description that never quotes a driver token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: &'static str,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: &'static str, description: impl Into<String>) -> Self {
        Self {
            field,
            description: description.into(),
        }
    }
}

/// A validated request, ready to be made durable.
#[derive(Clone, Debug)]
pub struct NewRequest {
    pub request_id: String,
    /// Canonical form: lower-case, hyphenated.
    pub station_id: String,
    pub token: DriverToken,
    pub fingerprint: Fingerprint,
    pub callback_url: Option<String>,
    pub accepted_at: Micros,
}

/// What makes a request the same one again: its request_id, with the station and the token it
/// came with. Every backend answers a request_id seen before by [`RequestKey::outcome_after`].
#[derive(Clone, Copy, Debug)]
pub struct RequestKey<'a> {
    pub request_id: &'a str,
    pub station_id: &'a str,
    pub fingerprint: &'a Fingerprint,
}

/// What a backend kept of the request that first used a request_id.
#[derive(Clone, Copy, Debug)]
pub struct EarlierRequest<'a> {
    pub station_id: &'a str,
    /// As stored (see [`Fingerprint::as_str`]).
    pub fingerprint: &'a str,
    pub accepted_at: Micros,
}

impl RequestKey<'_> {
    /// What this request gets when its request_id was accepted before as `earlier`: the original
    /// acknowledgement for the same station and token, `Conflict` for another.
    pub fn outcome_after(self, earlier: EarlierRequest<'_>) -> EnqueueOutcome {
        if earlier.station_id == self.station_id && earlier.fingerprint == self.fingerprint.as_str()
        {
            EnqueueOutcome::Duplicate {
                accepted_at: earlier.accepted_at,
            }
        } else {
            EnqueueOutcome::Conflict
        }
    }
}

impl<'a> From<&'a NewRequest> for RequestKey<'a> {
    fn from(r: &'a NewRequest) -> Self {
        Self {
            request_id: &r.request_id,
            station_id: &r.station_id,
            fingerprint: &r.fingerprint,
        }
    }
}

impl<'a> From<&'a NewDecision> for RequestKey<'a> {
    fn from(d: &'a NewDecision) -> Self {
        Self {
            request_id: &d.request_id,
            station_id: &d.station_id,
            fingerprint: &d.fingerprint,
        }
    }
}

/// A request that failed validation: each bad field, and what the caller sent as station and
/// request id (for the call record, which notes refused calls as sent; never the token).
pub struct Rejected {
    pub violations: Vec<FieldViolation>,
    pub station_id: String,
    pub request_id: String,
}

/// Only the violations: a caller may have put a token where the station id goes.
impl std::fmt::Debug for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rejected")
            .field("violations", &self.violations)
            .finish_non_exhaustive()
    }
}

/// Validates every field of `request` and reports each bad one.
pub fn validate(
    request: proto::AuthorizeRequest,
    fingerprinter: &Fingerprinter,
) -> Result<NewRequest, Rejected> {
    let mut violations = Vec::new();
    let station_id = match parse_station_id(&request.station_id) {
        Ok(id) => Some(id),
        Err(v) => {
            violations.push(v);
            None
        }
    };
    if request.driver_token.is_empty() {
        violations.push(FieldViolation::new("driver_token", "is required"));
    }
    let callback_url = match request.callback_url.as_str() {
        "" => None,
        raw => match check_callback_url(raw) {
            Ok(()) => Some(request.callback_url.clone()),
            Err(description) => {
                violations.push(FieldViolation::new("callback_url", description));
                None
            }
        },
    };
    if let Err(description) = check_request_id(&request.request_id) {
        violations.push(FieldViolation::new("request_id", description));
    }
    if !violations.is_empty() {
        return Err(Rejected {
            violations,
            station_id: request.station_id,
            request_id: request.request_id,
        });
    }
    // A present but malformed token is accepted and decided INVALID. An absurdly long one is cut
    // to a bounded prefix: it can never be well-formed, so nothing is lost but memory.
    let mut token = request.driver_token;
    if token.len() > MAX_HELD_TOKEN_LEN {
        let mut end = MAX_HELD_TOKEN_LEN;
        while !token.is_char_boundary(end) {
            end -= 1;
        }
        token.truncate(end);
    }
    let token = DriverToken::new(token);
    let request_id = match request.request_id {
        id if id.is_empty() => uuid::Uuid::now_v7().to_string(),
        id => id,
    };
    Ok(NewRequest {
        request_id,
        station_id: station_id.expect("no violations, so the station id parsed"),
        fingerprint: fingerprinter.fingerprint(&token),
        token,
        callback_url,
        accepted_at: Micros::now(),
    })
}

/// A station id: a hyphenated UUID in any case, returned in lower case.
pub fn parse_station_id(raw: &str) -> Result<String, FieldViolation> {
    parse_station_id_named("station_id", raw)
}

/// As [`parse_station_id`], reporting the violation under `field`.
pub fn parse_station_id_named(field: &'static str, raw: &str) -> Result<String, FieldViolation> {
    if raw.is_empty() {
        return Err(FieldViolation::new(field, "is required"));
    }
    let hyphenated = raw.len() == 36 && [8, 13, 18, 23].iter().all(|&i| raw.as_bytes()[i] == b'-');
    match uuid::Uuid::try_parse(raw) {
        Ok(id) if hyphenated => Ok(id.hyphenated().to_string()),
        _ => Err(FieldViolation::new(
            field,
            "must be a hyphenated UUID such as 6f1c2d3e-4a5b-4c6d-8e7f-0123456789ab",
        )),
    }
}

fn check_callback_url(raw: &str) -> Result<(), String> {
    if raw.len() > MAX_CALLBACK_URL_LEN {
        return Err(format!("must be at most {MAX_CALLBACK_URL_LEN} bytes"));
    }
    let url =
        Url::parse(raw).map_err(|e| format!("must be an absolute http or https URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must use the http or https scheme".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("must name a host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials".into());
    }
    Ok(())
}

/// Checks a caller-given request id (empty passes: the server assigns one).
pub fn check_request_id(raw: &str) -> Result<(), String> {
    if raw.len() > MAX_REQUEST_ID_LEN {
        return Err(format!("must be at most {MAX_REQUEST_ID_LEN} characters"));
    }
    if !raw
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b':' | b'-'))
    {
        return Err("may contain only A-Z, a-z, 0-9 and . _ ~ : -".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATION: &str = "6F1C2D3E-4A5B-4C6D-8E7F-0123456789AB";

    fn request(station: &str, token: &str, url: &str, id: &str) -> proto::AuthorizeRequest {
        proto::AuthorizeRequest {
            station_id: station.into(),
            driver_token: token.into(),
            callback_url: url.into(),
            request_id: id.into(),
        }
    }

    fn fields(r: proto::AuthorizeRequest) -> Vec<&'static str> {
        let fp = Fingerprinter::new(b"k").unwrap();
        validate(r, &fp)
            .unwrap_err()
            .violations
            .into_iter()
            .map(|v| v.field)
            .collect()
    }

    #[test]
    fn a_request_id_seen_before_is_a_duplicate_only_with_its_station_and_token() {
        let fp = Fingerprinter::new(b"k").unwrap();
        let r = validate(request(STATION, "AB12CD34", "", "r-1"), &fp).unwrap();
        let at = Micros(42);
        let earlier = |station_id, fingerprint| EarlierRequest {
            station_id,
            fingerprint,
            accepted_at: at,
        };
        let key = RequestKey::from(&r);
        let same = r.fingerprint.as_str();
        assert_eq!(
            key.outcome_after(earlier(&r.station_id, same)),
            EnqueueOutcome::Duplicate { accepted_at: at }
        );
        let other_token = fp.fingerprint(&DriverToken::new("AB12CD35"));
        assert_eq!(
            key.outcome_after(earlier(&r.station_id, other_token.as_str())),
            EnqueueOutcome::Conflict
        );
        assert_eq!(
            key.outcome_after(earlier("another-station", same)),
            EnqueueOutcome::Conflict
        );
    }

    #[test]
    fn accepts_and_normalizes_a_good_request() {
        let fp = Fingerprinter::new(b"k").unwrap();
        let r = validate(request(STATION, "short", "https://example.com/cb", ""), &fp).unwrap();
        assert_eq!(r.station_id, STATION.to_lowercase());
        assert!(
            !r.token.is_well_formed(),
            "a malformed token is accepted, to be decided INVALID"
        );
        assert_eq!(
            uuid::Uuid::parse_str(&r.request_id)
                .unwrap()
                .get_version_num(),
            7
        );
    }

    #[test]
    fn reports_every_bad_field() {
        assert_eq!(
            fields(request("", "", "", "")),
            ["station_id", "driver_token"]
        );
        assert_eq!(
            fields(request("6f1c2d3e4a5b4c6d8e7f0123456789ab", "t", "", "")),
            ["station_id"]
        );
        assert_eq!(
            fields(request(
                "{6f1c2d3e-4a5b-4c6d-8e7f-0123456789ab}",
                "t",
                "",
                ""
            )),
            ["station_id"]
        );
        for url in [
            "ftp://x/y",
            "/relative",
            "http://",
            "https://user:pw@example.com/",
        ] {
            assert_eq!(
                fields(request(STATION, "t", url, "")),
                ["callback_url"],
                "{url}"
            );
        }
        let long_url = format!("https://example.com/{}", "a".repeat(2048));
        assert_eq!(
            fields(request(STATION, "t", &long_url, "")),
            ["callback_url"]
        );
        assert_eq!(
            fields(request(STATION, "t", "", "has space")),
            ["request_id"]
        );
        assert_eq!(
            fields(request(STATION, "t", "", &"a".repeat(129))),
            ["request_id"]
        );
    }

    #[test]
    fn violations_never_quote_the_token() {
        let fp = Fingerprinter::new(b"k").unwrap();
        let v = validate(request("bad", "SECRET-TOKEN-1234567890", "x", "y z"), &fp)
            .unwrap_err()
            .violations;
        assert!(v.iter().all(|v| !v.description.contains("SECRET")));
    }
}
