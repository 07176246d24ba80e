//! The parsers hostile bytes reach first, each behind one function that must return for any
//! input: the fuzz targets of `fuzz/` call them, and a test replays their corpora
//! (`tests/it/fuzz_corpora.rs`), so a crash the fuzzer found stays fixed.

use prost::Message;

use crate::{
    authorizer::acl, cursor::Cursor, intake, proto::AuthorizeRequest, security::clients,
    token::Fingerprinter,
};

/// A fuzz target: any bytes in, a panic only on a defect.
pub type Target = fn(&[u8]);

/// The fuzz targets by name (the folders of `fuzz/corpus/`).
pub const TARGETS: [(&str, Target); 4] = [
    ("request_validation", request_validation),
    ("cursor", cursor),
    ("acl_csv", acl_csv),
    ("clients_file", clients_file),
];

fn fingerprinter() -> Fingerprinter {
    Fingerprinter::new(b"fuzzing-key").expect("a key")
}

/// An `AuthorizeRequest` as it comes off the wire, then validated: an accepted request keeps
/// its token as sent, and no violation depends on the token's bytes (the same request with
/// another token of the same length is refused in the same words), so none can repeat it.
pub fn request_validation(data: &[u8]) {
    let Ok(request) = AuthorizeRequest::decode(data) else {
        return;
    };
    let token = request.driver_token.clone();
    let other = AuthorizeRequest {
        driver_token: "x".repeat(token.chars().count()),
        ..request.clone()
    };
    let words = |r: Result<intake::NewRequest, intake::Rejected>| match r {
        Ok(_) => Vec::new(),
        Err(rejected) => rejected
            .violations
            .into_iter()
            .map(|v| (v.field, v.description))
            .collect(),
    };
    let first = intake::validate(request, &fingerprinter());
    if let Ok(new) = &first {
        assert_eq!(new.token.expose(), token);
    }
    let with_other = intake::validate(other, &fingerprinter());
    assert_eq!(
        words(first),
        words(with_other),
        "a violation depends on the token's bytes"
    );
}

/// A cursor from a client: decoding never panics, and what decodes encodes back to a cursor
/// that decodes the same.
pub fn cursor(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cursor) = Cursor::decode(text) {
        assert_eq!(Cursor::decode(&cursor.encode()), Ok(cursor));
    }
}

/// An access-list file.
pub fn acl_csv(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = acl::parse(text, &fingerprinter());
    }
}

/// A clients file; an error names a line of the file.
pub fn clients_file(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Err((line, _)) = clients::parse(text)
    {
        assert!(
            line <= text.lines().count() + 1,
            "line {line} is past the end"
        );
    }
}
