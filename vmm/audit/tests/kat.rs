//! Known-answer tests: roots, inclusion proofs and consistency proofs of the crate's tree
//! code (in memory and on disk) against an independent reference of RFC 6962 section 2.1,
//! written here as the RFC states it: recursive MTH, PATH and PROOF over the leaf data,
//! with blake3 as the hash.

mod common;

use carrel_audit::tree::{self, Hash, MemoryTree, NodeSource};
use carrel_audit::tree_store::TreeStore;
use common::TempDir;

// ---- Reference: RFC 6962 section 2.1, recursively over the leaf inputs. ----

fn reference_hash(parts: &[&[u8]]) -> Hash {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(part);
    }
    *hasher.finalize().as_bytes()
}

/// The largest power of two smaller than n.
fn reference_k(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// MTH(D[n]).
fn reference_mth(d: &[Vec<u8>]) -> Hash {
    match d.len() {
        0 => reference_hash(&[]),
        1 => reference_hash(&[&[0x00], &d[0]]),
        n => {
            let k = reference_k(n);
            reference_hash(&[&[0x01], &reference_mth(&d[..k]), &reference_mth(&d[k..])])
        }
    }
}

/// PATH(m, D[n]).
fn reference_path(m: usize, d: &[Vec<u8>]) -> Vec<Hash> {
    let n = d.len();
    if n == 1 {
        return Vec::new();
    }
    let k = reference_k(n);
    if m < k {
        let mut path = reference_path(m, &d[..k]);
        path.push(reference_mth(&d[k..]));
        path
    } else {
        let mut path = reference_path(m - k, &d[k..]);
        path.push(reference_mth(&d[..k]));
        path
    }
}

/// SUBPROOF(m, D[n], b).
fn reference_subproof(m: usize, d: &[Vec<u8>], b: bool) -> Vec<Hash> {
    let n = d.len();
    if m == n {
        return if b { Vec::new() } else { vec![reference_mth(d)] };
    }
    let k = reference_k(n);
    if m <= k {
        let mut proof = reference_subproof(m, &d[..k], b);
        proof.push(reference_mth(&d[k..]));
        proof
    } else {
        let mut proof = reference_subproof(m - k, &d[k..], false);
        proof.push(reference_mth(&d[..k]));
        proof
    }
}

/// PROOF(m, D[n]); empty for m == 0 (the empty tree is a prefix of every tree).
fn reference_proof(m: usize, d: &[Vec<u8>]) -> Vec<Hash> {
    if m == 0 {
        return Vec::new();
    }
    reference_subproof(m, d, true)
}

// ---- The crate under test. ----

fn leaf_data(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("carrel leaf {i}").into_bytes()).collect()
}

fn memory_tree(d: &[Vec<u8>]) -> MemoryTree {
    MemoryTree::from_leaves(d.iter().map(|leaf| tree::leaf_hash(leaf)))
}

#[test]
fn root_of_sizes_0_to_64_matches_reference() {
    let d = leaf_data(64);
    let memory = memory_tree(&d);
    for n in 0..=64 {
        let expected = reference_mth(&d[..n]);
        assert_eq!(tree::root(&memory, n as u64).unwrap(), expected, "size {n}");
        let mut frontier = tree::Frontier::new();
        for leaf in &d[..n] {
            frontier.push(tree::leaf_hash(leaf));
        }
        assert_eq!(frontier.root(), expected, "frontier size {n}");
    }
}

#[test]
fn inclusion_proofs_of_sizes_1_to_64_match_reference_and_verify() {
    let d = leaf_data(64);
    let memory = memory_tree(&d);
    for n in 1..=64usize {
        let root = reference_mth(&d[..n]);
        for m in 0..n {
            let expected = reference_path(m, &d[..n]);
            let proof = tree::inclusion_proof(&memory, m as u64, n as u64).unwrap();
            assert_eq!(proof, expected, "PATH({m}, D[{n}])");
            tree::verify_inclusion(&tree::leaf_hash(&d[m]), m as u64, n as u64, &proof, &root)
                .unwrap_or_else(|e| panic!("PATH({m}, D[{n}]) does not verify: {e}"));
        }
    }
}

#[test]
fn consistency_proofs_of_sizes_0_to_64_match_reference_and_verify() {
    let d = leaf_data(64);
    let memory = memory_tree(&d);
    for n in 0..=64usize {
        let new_root = reference_mth(&d[..n]);
        for m in 0..=n {
            let expected = reference_proof(m, &d[..n]);
            let proof = tree::consistency_proof(&memory, m as u64, n as u64).unwrap();
            assert_eq!(proof, expected, "PROOF({m}, D[{n}])");
            let old_root = reference_mth(&d[..m]);
            tree::verify_consistency(m as u64, n as u64, &old_root, &new_root, &proof)
                .unwrap_or_else(|e| panic!("PROOF({m}, D[{n}]) does not verify: {e}"));
        }
    }
}

#[test]
fn tampered_proofs_of_sizes_1_to_64_fail_verification() {
    let d = leaf_data(64);
    let memory = memory_tree(&d);
    for n in 1..=64usize {
        let root = reference_mth(&d[..n]);
        for m in 0..n {
            let leaf = tree::leaf_hash(&d[m]);
            let proof = reference_path(m, &d[..n]);
            for i in 0..proof.len() {
                let mut bad = proof.clone();
                bad[i][i % 32] ^= 0x01;
                assert!(tree::verify_inclusion(&leaf, m as u64, n as u64, &bad, &root).is_err());
            }
            if n > 1 {
                let other = (m + 1) % n;
                assert!(
                    tree::verify_inclusion(&leaf, other as u64, n as u64, &proof, &root).is_err()
                        || tree::leaf_hash(&d[other]) == leaf,
                    "PATH({m}, D[{n}]) verifies for index {other}"
                );
            }
        }
        for m in 1..n {
            let old_root = reference_mth(&d[..m]);
            let proof = tree::consistency_proof(&memory, m as u64, n as u64).unwrap();
            for i in 0..proof.len() {
                let mut bad = proof.clone();
                bad[i][31 - i % 32] ^= 0x80;
                assert!(
                    tree::verify_consistency(m as u64, n as u64, &old_root, &root, &bad).is_err(),
                    "tampered PROOF({m}, D[{n}]) at {i} verifies"
                );
            }
            let mut short = proof.clone();
            short.pop();
            assert!(tree::verify_consistency(m as u64, n as u64, &old_root, &root, &short).is_err());
            let wrong_old = reference_mth(&d[1..=m]);
            assert!(tree::verify_consistency(m as u64, n as u64, &wrong_old, &root, &proof).is_err());
        }
    }
}

#[test]
fn proofs_of_large_sizes_from_tree_store_match_reference() {
    let dir = TempDir::new("kat-large");
    let largest = 65_537usize;
    let d = leaf_data(largest);
    let mut store = TreeStore::open(dir.path()).unwrap();
    let leaves: Vec<Hash> = d.iter().map(|leaf| tree::leaf_hash(leaf)).collect();
    for chunk in leaves.chunks(10_000) {
        store.append(chunk).unwrap();
    }
    for n in [1000usize, 4097, 65_536, 65_537] {
        let root = reference_mth(&d[..n]);
        assert_eq!(tree::root(&store, n as u64).unwrap(), root, "size {n}");
        for m in [0, 1, n / 3, n / 2 + 1, n - 2, n - 1] {
            let proof = tree::inclusion_proof(&store, m as u64, n as u64).unwrap();
            assert_eq!(proof, reference_path(m, &d[..n]), "PATH({m}, D[{n}])");
            tree::verify_inclusion(&leaves[m], m as u64, n as u64, &proof, &root).unwrap();
        }
        for m in [1, 2, 3, 999, 1024, n / 2 + 7, n - 1, n].into_iter().filter(|&m| m <= n) {
            let proof = tree::consistency_proof(&store, m as u64, n as u64).unwrap();
            assert_eq!(proof, reference_proof(m, &d[..n]), "PROOF({m}, D[{n}])");
            let old_root = reference_mth(&d[..m]);
            tree::verify_consistency(m as u64, n as u64, &old_root, &root, &proof).unwrap();
        }
    }
    assert_eq!(store.node(16, 1), None, "no complete subtree of 2^16 leaves at index 1 yet");
}

#[test]
fn root_of_seven_leaves_matches_pinned_value() {
    // Pins the hashing rules (prefixes, split point, blake3): a change here changes every
    // root ever signed.
    let d = leaf_data(7);
    let root = tree::root(&memory_tree(&d), 7).unwrap();
    assert_eq!(root, reference_mth(&d));
    assert_eq!(carrel_audit::codec::to_hex(&root), PINNED_ROOT_OF_SEVEN);
}

/// Computed independently with the Python `blake3` package and the same recursive MTH.
const PINNED_ROOT_OF_SEVEN: &str = "93fe405f4a20eb357e2f886f5bb051da5d16af2e55a6161437d9690edf837e3d";
