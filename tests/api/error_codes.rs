//! The book's error-code table and the code enums agree in both directions:
//! every code a caller can receive is documented, and every documented code is
//! one the service can answer with.

use std::collections::BTreeSet;

/// The `error_code` column (the third) of the table in docs/src/error-codes.md.
fn documented() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/src/error-codes.md");
    let text = std::fs::read_to_string(path).expect("read the error-code chapter");
    let mut codes = Vec::new();
    for row in text.lines().filter(|l| l.starts_with("| ")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        // ["", HTTP, error, error_code, when, ""]
        assert_eq!(cells.len(), 6, "a table row of four cells: {row}");
        if cells[1] == "HTTP" || cells[1].starts_with("---") {
            continue;
        }
        let cell = cells[3];
        let mut found = 0;
        for code in cell.split('`').skip(1).step_by(2) {
            codes.push(code.to_string());
            found += 1;
        }
        assert!(found > 0, "a row without a code: {row}");
    }
    codes
}

#[test]
fn every_code_the_service_answers_with_is_in_the_book_and_nothing_else() {
    let mut all = keycloak_ci_sts::api::all_codes();
    all.extend(
        keycloak_ci_sts::exchange::AuditOnlyCode::ALL
            .iter()
            .map(|c| c.as_str()),
    );
    let service: BTreeSet<&str> = all.iter().copied().collect();
    assert_eq!(service.len(), all.len(), "a code is listed by two enums");

    let docs = documented();
    let book: BTreeSet<&str> = docs.iter().map(String::as_str).collect();
    assert_eq!(book.len(), docs.len(), "a code has two rows in the table");

    let undocumented: Vec<_> = service.difference(&book).collect();
    assert!(
        undocumented.is_empty(),
        "codes missing from docs/src/error-codes.md: {undocumented:?}"
    );
    let unknown: Vec<_> = book.difference(&service).collect();
    assert!(
        unknown.is_empty(),
        "codes in docs/src/error-codes.md that no error enum has: {unknown:?}"
    );
}

#[test]
fn codes_are_lowercase_area_dot_name() {
    for code in keycloak_ci_sts::api::all_codes() {
        let (area, name) = code.split_once('.').expect("area.name");
        assert!(
            !area.is_empty()
                && !name.is_empty()
                && code
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.'),
            "{code}"
        );
    }
}
