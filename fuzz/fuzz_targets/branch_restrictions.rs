#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| keycloak_ci_sts::fuzzing::branch_restrictions(data));
