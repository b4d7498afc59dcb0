//! Merkle tree math in the shape of RFC 6962 / RFC 9162, with blake3 as the hash.
//!
//! This module owns the hashing rules (leaf hash `blake3(0x00 || leaf)`, node hash
//! `blake3(0x01 || left || right)`, the empty tree hashes to `blake3("")`), proof
//! generation and proof verification. It is pure: no I/O. Proof generation reads the
//! hashes of *complete* subtrees through [`NodeSource`]; a complete subtree at `level`
//! and `index` covers leaves `[index << level, (index + 1) << level)`. Every node of an
//! RFC 6962 tree is either such a complete subtree or lies on the right edge, and a
//! right-edge node is the fold of at most one complete subtree per level, so a proof
//! needs O(log n) node reads.

use thiserror::Error;

/// A 32-byte blake3 digest: a leaf hash, a node hash or a root.
pub type Hash = [u8; 32];

/// Leaf hashes are domain-separated from node hashes (RFC 6962 section 2.1).
const LEAF_PREFIX: u8 = 0x00;
const NODE_PREFIX: u8 = 0x01;

/// The deepest tree we accept: a level above 63 cannot index a u64 leaf.
pub const MAX_LEVELS: u32 = 64;

/// Errors of proof generation and verification.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("leaf index {index} is outside a tree of size {size}")]
    CheckLeafIndex { index: u64, size: u64 },
    #[error("tree size {old} is larger than tree size {new}")]
    CheckSizes { old: u64, new: u64 },
    #[error("the tree store has no hash for the complete subtree at level {level}, index {index}")]
    ReadNode { level: u32, index: u64 },
    #[error("the proof has {actual} hashes, a proof for these sizes has {expected}")]
    CheckProofLength { expected: usize, actual: usize },
    #[error("the proof does not lead to the expected root")]
    VerifyRoot,
    #[error("the proof does not lead to the expected old root")]
    VerifyOldRoot,
}

/// The hash of a leaf's bytes.
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&[LEAF_PREFIX]);
    hasher.update(leaf);
    *hasher.finalize().as_bytes()
}

/// The hash of an interior node from its two children.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut buffer = [0u8; 65];
    buffer[0] = NODE_PREFIX;
    buffer[1..33].copy_from_slice(left);
    buffer[33..].copy_from_slice(right);
    *blake3::hash(&buffer).as_bytes()
}

/// The root of the empty tree: the hash of the empty string.
pub fn empty_root() -> Hash {
    *blake3::hash(&[]).as_bytes()
}

/// Read access to the hashes of complete subtrees.
pub trait NodeSource {
    /// The hash of the complete subtree at `level` (0 = leaf hashes) and `index`, or `None`
    /// when the source does not hold it.
    fn node(&self, level: u32, index: u64) -> Option<Hash>;
}

fn read_node<S: NodeSource + ?Sized>(source: &S, level: u32, index: u64) -> Result<Hash, TreeError> {
    source.node(level, index).ok_or(TreeError::ReadNode { level, index })
}

/// The largest power of two strictly smaller than `n` (`n >= 2`): RFC 6962's split point.
fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// The hash of the RFC 6962 node over leaves `[start, end)`. The range must be a node of
/// some tree: `start` is a multiple of the largest power of two not above `end - start`,
/// which holds for every range the recursive split produces. The range is cut into
/// complete subtrees, largest first, and folded from the right.
pub fn range_hash<S: NodeSource + ?Sized>(source: &S, start: u64, end: u64) -> Result<Hash, TreeError> {
    if start >= end {
        return Ok(empty_root());
    }
    // Complete subtrees of the range, left to right: the bits of the width, high to low.
    let mut pieces: [(u32, u64); MAX_LEVELS as usize] = [(0, 0); MAX_LEVELS as usize];
    let mut count = 0;
    let mut position = start;
    let width = end - start;
    for level in (0..MAX_LEVELS).rev() {
        if width & (1u64 << level) != 0 {
            pieces[count] = (level, position >> level);
            count += 1;
            position += 1u64 << level;
        }
    }
    let (level, index) = pieces[count - 1];
    let mut hash = read_node(source, level, index)?;
    for &(level, index) in pieces[..count - 1].iter().rev() {
        hash = node_hash(&read_node(source, level, index)?, &hash);
    }
    Ok(hash)
}

/// The root of the tree made of the first `size` leaves.
pub fn root<S: NodeSource + ?Sized>(source: &S, size: u64) -> Result<Hash, TreeError> {
    range_hash(source, 0, size)
}

/// The inclusion proof (RFC 9162 section 2.1.3.1) of leaf `index` in the tree of the first
/// `size` leaves: sibling hashes from the leaf up to the root.
pub fn inclusion_proof<S: NodeSource + ?Sized>(source: &S, index: u64, size: u64) -> Result<Vec<Hash>, TreeError> {
    if index >= size {
        return Err(TreeError::CheckLeafIndex { index, size });
    }
    // Walk down from the root collecting siblings, then reverse to go leaf-first.
    let mut path = Vec::with_capacity(64);
    let (mut start, mut end) = (0u64, size);
    while end - start > 1 {
        let k = split_point(end - start);
        if index < start + k {
            path.push(range_hash(source, start + k, end)?);
            end = start + k;
        } else {
            path.push(range_hash(source, start, start + k)?);
            start += k;
        }
    }
    path.reverse();
    Ok(path)
}

/// The consistency proof (RFC 9162 section 2.1.4.1) between the tree of the first
/// `old_size` leaves and the tree of the first `new_size` leaves. Empty when the sizes are
/// equal or the old tree is empty.
pub fn consistency_proof<S: NodeSource + ?Sized>(
    source: &S,
    old_size: u64,
    new_size: u64,
) -> Result<Vec<Hash>, TreeError> {
    if old_size > new_size {
        return Err(TreeError::CheckSizes { old: old_size, new: new_size });
    }
    if old_size == 0 || old_size == new_size {
        return Ok(Vec::new());
    }
    // SUBPROOF(m, D[start:end], whole), walked iteratively from the top; hashes are found
    // top-down and the proof lists them bottom-up.
    let mut proof = Vec::with_capacity(64);
    let (mut start, mut end) = (0u64, new_size);
    let mut m = old_size;
    let mut whole = true;
    loop {
        let n = end - start;
        if m == n {
            if !whole {
                proof.push(range_hash(source, start, end)?);
            }
            break;
        }
        let k = split_point(n);
        if m <= k {
            proof.push(range_hash(source, start + k, end)?);
            end = start + k;
        } else {
            proof.push(range_hash(source, start, start + k)?);
            start += k;
            m -= k;
            whole = false;
        }
    }
    proof.reverse();
    Ok(proof)
}

/// The number of hashes in an inclusion proof for `index` in a tree of `size` leaves.
fn inclusion_proof_length(index: u64, size: u64) -> usize {
    let (mut start, mut end, mut length) = (0u64, size, 0usize);
    while end - start > 1 {
        let k = split_point(end - start);
        if index < start + k {
            end = start + k;
        } else {
            start += k;
        }
        length += 1;
    }
    length
}

/// Checks that `path` proves leaf `leaf` at `index` in the tree of `size` leaves with root
/// `root` (RFC 9162 section 2.1.3.2).
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, path: &[Hash], root: &Hash) -> Result<(), TreeError> {
    if index >= size {
        return Err(TreeError::CheckLeafIndex { index, size });
    }
    let expected = inclusion_proof_length(index, size);
    if path.len() != expected {
        return Err(TreeError::CheckProofLength { expected, actual: path.len() });
    }
    let (mut f, mut s) = (index, size - 1);
    let mut hash = *leaf;
    for sibling in path {
        if s == 0 {
            return Err(TreeError::VerifyRoot);
        }
        if f & 1 == 1 || f == s {
            hash = node_hash(sibling, &hash);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            hash = node_hash(&hash, sibling);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 || hash != *root {
        return Err(TreeError::VerifyRoot);
    }
    Ok(())
}

/// Checks that `proof` shows the tree of `old_size` leaves with root `old_root` is a prefix
/// of the tree of `new_size` leaves with root `new_root` (RFC 9162 section 2.1.4.2).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), TreeError> {
    if old_size > new_size {
        return Err(TreeError::CheckSizes { old: old_size, new: new_size });
    }
    if old_size == new_size {
        if !proof.is_empty() {
            return Err(TreeError::CheckProofLength { expected: 0, actual: proof.len() });
        }
        if old_root != new_root {
            return Err(TreeError::VerifyRoot);
        }
        return Ok(());
    }
    if old_size == 0 {
        if !proof.is_empty() {
            return Err(TreeError::CheckProofLength { expected: 0, actual: proof.len() });
        }
        if *old_root != empty_root() {
            return Err(TreeError::VerifyOldRoot);
        }
        return Ok(());
    }
    if proof.is_empty() {
        return Err(TreeError::CheckProofLength { expected: 1, actual: 0 });
    }
    // When the old tree is a complete subtree its root is the first hash of the path.
    let mut hashes = proof.iter();
    let first = if old_size.is_power_of_two() { *old_root } else { *hashes.next().ok_or(TreeError::VerifyRoot)? };
    let (mut f, mut s) = (old_size - 1, new_size - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut old_hash, mut new_hash) = (first, first);
    for sibling in hashes {
        if s == 0 {
            return Err(TreeError::VerifyRoot);
        }
        if f & 1 == 1 || f == s {
            old_hash = node_hash(sibling, &old_hash);
            new_hash = node_hash(sibling, &new_hash);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            new_hash = node_hash(&new_hash, sibling);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(TreeError::VerifyRoot);
    }
    if old_hash != *old_root {
        return Err(TreeError::VerifyOldRoot);
    }
    if new_hash != *new_root {
        return Err(TreeError::VerifyRoot);
    }
    Ok(())
}

/// A streaming tree builder: leaves go in one at a time, and the root of the leaves so far
/// is available at any point in O(log n). Holds one hash per level (the right edge), so it
/// is what the verifier uses to recompute a whole log without trusting stored hashes.
#[derive(Debug, Clone, Default)]
pub struct Frontier {
    /// `edge[level]` is the hash of the pending complete subtree at `level`, present when
    /// bit `level` of `size` is set.
    edge: Vec<Hash>,
    size: u64,
}

impl Frontier {
    /// An empty tree.
    pub fn new() -> Frontier {
        Frontier::default()
    }

    /// The number of leaves pushed.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Adds a leaf hash; calls `completed(level, index, hash)` for every complete subtree
    /// that this leaf completes, the leaf itself first (level 0).
    pub fn push_with(&mut self, leaf: Hash, mut completed: impl FnMut(u32, u64, &Hash)) {
        let index = self.size;
        completed(0, index, &leaf);
        let mut hash = leaf;
        let mut level = 0u32;
        while (index >> level) & 1 == 1 {
            hash = node_hash(&self.edge[level as usize], &hash);
            level += 1;
            completed(level, index >> level, &hash);
        }
        if self.edge.len() <= level as usize {
            self.edge.resize(level as usize + 1, [0; 32]);
        }
        self.edge[level as usize] = hash;
        self.size += 1;
    }

    /// Adds a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        self.push_with(leaf, |_, _, _| {});
    }

    /// The root of the leaves pushed so far.
    pub fn root(&self) -> Hash {
        if self.size == 0 {
            return empty_root();
        }
        let mut hash: Option<Hash> = None;
        for level in 0..self.edge.len() {
            if self.size & (1u64 << level) != 0 {
                let piece = &self.edge[level];
                hash = Some(match hash {
                    None => *piece,
                    Some(right) => node_hash(piece, &right),
                });
            }
        }
        hash.unwrap_or_else(empty_root)
    }
}

/// A whole tree in memory: every complete subtree hash per level. For tests, tools and
/// small logs; the on-disk store keeps the same layout in files.
#[derive(Debug, Clone, Default)]
pub struct MemoryTree {
    levels: Vec<Vec<Hash>>,
}

impl MemoryTree {
    /// An empty tree.
    pub fn new() -> MemoryTree {
        MemoryTree::default()
    }

    /// A tree over these leaf hashes.
    pub fn from_leaves(leaves: impl IntoIterator<Item = Hash>) -> MemoryTree {
        let mut tree = MemoryTree::new();
        for leaf in leaves {
            tree.push(leaf);
        }
        tree
    }

    /// The number of leaves.
    pub fn size(&self) -> u64 {
        self.levels.first().map_or(0, |level| level.len() as u64)
    }

    /// Appends a leaf hash, adding every complete subtree it closes.
    pub fn push(&mut self, leaf: Hash) {
        let mut level = 0usize;
        let mut hash = leaf;
        loop {
            if self.levels.len() <= level {
                self.levels.push(Vec::new());
            }
            self.levels[level].push(hash);
            let count = self.levels[level].len();
            if count % 2 == 1 {
                break;
            }
            hash = node_hash(&self.levels[level][count - 2], &self.levels[level][count - 1]);
            level += 1;
        }
    }
}

impl NodeSource for MemoryTree {
    fn node(&self, level: u32, index: u64) -> Option<Hash> {
        let index = usize::try_from(index).ok()?;
        self.levels.get(level as usize)?.get(index).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_le_bytes())).collect()
    }

    #[test]
    fn root_of_empty_tree_is_hash_of_empty_string() {
        assert_eq!(root(&MemoryTree::new(), 0).unwrap(), *blake3::hash(b"").as_bytes());
        assert_eq!(Frontier::new().root(), empty_root());
    }

    #[test]
    fn root_of_three_leaves_splits_two_and_one() {
        let l = leaves(3);
        let tree = MemoryTree::from_leaves(l.clone());
        let expected = node_hash(&node_hash(&l[0], &l[1]), &l[2]);
        assert_eq!(root(&tree, 3).unwrap(), expected);
    }

    #[test]
    fn frontier_root_matches_memory_tree_root() {
        let l = leaves(100);
        let tree = MemoryTree::from_leaves(l.clone());
        let mut frontier = Frontier::new();
        for (i, leaf) in l.iter().enumerate() {
            frontier.push(*leaf);
            assert_eq!(frontier.root(), root(&tree, i as u64 + 1).unwrap(), "size {}", i + 1);
        }
    }

    #[test]
    fn frontier_reports_every_complete_subtree_once() {
        let l = leaves(37);
        let tree = MemoryTree::from_leaves(l.clone());
        let mut frontier = Frontier::new();
        let mut seen = 0;
        for leaf in l {
            frontier.push_with(leaf, |level, index, hash| {
                assert_eq!(tree.node(level, index), Some(*hash));
                seen += 1;
            });
        }
        // 37 + 18 + 9 + 4 + 2 + 1 complete subtrees.
        assert_eq!(seen, 71);
    }

    #[test]
    fn inclusion_proof_beyond_size_returns_error() {
        let tree = MemoryTree::from_leaves(leaves(4));
        assert_eq!(inclusion_proof(&tree, 4, 4), Err(TreeError::CheckLeafIndex { index: 4, size: 4 }));
    }

    #[test]
    fn inclusion_proof_with_missing_node_returns_error() {
        let tree = MemoryTree::from_leaves(leaves(4));
        assert!(matches!(inclusion_proof(&tree, 0, 8), Err(TreeError::ReadNode { .. })));
    }

    #[test]
    fn verify_inclusion_with_wrong_sibling_fails() {
        let l = leaves(11);
        let tree = MemoryTree::from_leaves(l.clone());
        let root = root(&tree, 11).unwrap();
        let mut path = inclusion_proof(&tree, 6, 11).unwrap();
        verify_inclusion(&l[6], 6, 11, &path, &root).unwrap();
        path[1][0] ^= 1;
        assert_eq!(verify_inclusion(&l[6], 6, 11, &path, &root), Err(TreeError::VerifyRoot));
    }

    #[test]
    fn verify_inclusion_with_extra_hash_fails() {
        let l = leaves(8);
        let tree = MemoryTree::from_leaves(l.clone());
        let root = root(&tree, 8).unwrap();
        let mut path = inclusion_proof(&tree, 3, 8).unwrap();
        path.push(root);
        assert!(matches!(verify_inclusion(&l[3], 3, 8, &path, &root), Err(TreeError::CheckProofLength { .. })));
    }

    #[test]
    fn verify_consistency_with_swapped_roots_fails() {
        let tree = MemoryTree::from_leaves(leaves(20));
        let old = root(&tree, 7).unwrap();
        let new = root(&tree, 20).unwrap();
        let proof = consistency_proof(&tree, 7, 20).unwrap();
        verify_consistency(7, 20, &old, &new, &proof).unwrap();
        assert!(verify_consistency(7, 20, &new, &old, &proof).is_err());
    }

    #[test]
    fn verify_consistency_from_empty_tree_accepts_empty_proof() {
        let tree = MemoryTree::from_leaves(leaves(5));
        let new = root(&tree, 5).unwrap();
        verify_consistency(0, 5, &empty_root(), &new, &[]).unwrap();
        assert!(verify_consistency(0, 5, &new, &new, &[]).is_err());
    }

    #[test]
    fn consistency_proof_with_old_larger_than_new_returns_error() {
        let tree = MemoryTree::from_leaves(leaves(5));
        assert_eq!(consistency_proof(&tree, 6, 5), Err(TreeError::CheckSizes { old: 6, new: 5 }));
    }
}
