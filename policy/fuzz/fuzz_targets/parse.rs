//! Fuzz the policy parser (native v1 and MXC ContainerConfig, picked by content): any
//! bytes give a policy or an error naming the field at fault, never a panic, and a
//! policy that parses gives an error message or a model that formats.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match policy::parse_str(&text, "fuzz.json") {
        Ok(p) => {
            let _ = format!("{p:?}");
            let _ = p.exec_timeout();
        }
        Err(e) => {
            let message = e.to_string();
            assert!(!message.is_empty());
        }
    }
});
