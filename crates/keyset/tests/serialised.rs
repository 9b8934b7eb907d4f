// SPDX-License-Identifier: Apache-2.0
//! Concurrent unlock attempts are serialised: a burst of wrong guesses never runs more than one
//! Argon2id derivation (and so never holds more than one block array) at a time. Alone in its
//! test binary so the process-wide derivation counter sees only these attempts.

use std::sync::{Arc, Barrier};

use piccolo_keyset::{Error, KdfParams, Keyset, Password};

const FAST: KdfParams = KdfParams { m_cost_kib: KdfParams::MIN_M_COST_KIB, t_cost: 1, p_cost: 1 };

fn pw(s: &str) -> Password {
    Password::new(s.to_string()).unwrap()
}

#[test]
fn concurrent_wrong_unlocks_are_serialised() {
    let dir = tempfile::tempdir().unwrap();
    Keyset::create(dir.path(), &pw("correct horse battery"), FAST).unwrap();
    let ks = Arc::new(Keyset::read(dir.path()).unwrap());
    const N: usize = 8;
    piccolo_keyset::hooks::reset_derivation_stats();
    let barrier = Arc::new(Barrier::new(N));
    let threads: Vec<_> = (0..N)
        .map(|i| {
            let ks = Arc::clone(&ks);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                ks.unlock_with_password(&pw(&format!("wrong guess {i}")))
            })
        })
        .collect();
    for t in threads {
        assert!(matches!(t.join().unwrap(), Err(Error::WrongPassword)));
    }
    let (peak, total) = piccolo_keyset::hooks::derivation_stats();
    assert_eq!(total, N, "every guess ran a derivation");
    assert_eq!(peak, 1, "derivations overlapped: {peak} at once");
}
