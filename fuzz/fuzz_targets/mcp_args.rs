#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| keycloak_ci_sts::fuzzing::mcp_args(data));
