//! Keyword side of hybrid search and the fusion of the two rankings. Owns the BM25 encoder (Qdrant's
//! own: the same tokenizer, English stemmer and stopwords, and murmur3 term ids as a Qdrant server's
//! `qdrant/bm25` inference, so sparse vectors written here mean the same on a remote cluster) and
//! reciprocal rank fusion. IDF is not computed here: the sparse vector is stored with Qdrant's `idf`
//! modifier, so the engine weighs terms by the live corpus at query time. Must not: touch a backend.

use qdrant_edge::bm25_embed::{EdgeBm25, EdgeBm25Config};
use qdrant_edge::external::uuid::Uuid;
use qdrant_edge::SparseVector;
use std::collections::HashMap;
use std::sync::OnceLock;

/// Name of the sparse vector every point carries next to its unnamed dense one.
pub const SPARSE: &str = "bm25";
/// RRF's rank constant (Cormack et al.; Qdrant's default): damps the head of each list.
pub const RRF_K: f32 = 60.0;

fn encoder() -> &'static EdgeBm25 {
    static BM25: OnceLock<EdgeBm25> = OnceLock::new();
    BM25.get_or_init(|| EdgeBm25::new(EdgeBm25Config::default()).expect("the default BM25 config is valid"))
}

/// A stored text's term weights (BM25 term-frequency saturation and length normalization).
pub fn document(text: &str) -> SparseVector {
    encoder().embed_document(text)
}

/// A query's terms (each weight 1; IDF comes from the store).
pub fn query(text: &str) -> SparseVector {
    encoder().embed_query(text)
}

/// How a search ranks: cosine only, BM25 only, or both fused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    /// Cosine similarity of the embeddings; the score is the cosine.
    #[default]
    Dense,
    /// BM25 over the words; the score is BM25 with the store's IDF.
    Keyword,
    /// Both rankings fused by reciprocal rank; the score is the fused score scaled to [0, 1]
    /// (1 = first in both lists).
    Hybrid,
}

/// Fuses ranked id lists by reciprocal rank: `sum 1 / (k + rank)`, best first, scaled so that
/// first place in every list scores 1. Ties keep the order of first appearance (dense first).
pub fn rrf(lists: &[Vec<Uuid>], limit: usize) -> Vec<(Uuid, f32)> {
    let mut score: HashMap<Uuid, (f32, usize)> = HashMap::new();
    let mut seen = 0;
    for list in lists {
        for (rank, id) in list.iter().enumerate() {
            let e = score.entry(*id).or_insert_with(|| {
                seen += 1;
                (0.0, seen)
            });
            e.0 += 1.0 / (RRF_K + rank as f32 + 1.0);
        }
    }
    let best = lists.len() as f32 / (RRF_K + 1.0);
    let mut out: Vec<_> = score.into_iter().map(|(id, (s, order))| (id, s / best, order)).collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)));
    out.into_iter().take(limit).map(|(id, s, _)| (id, s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rrf_rewards_agreement_and_scales_to_one() {
        let [a, b, c] = [Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3)];
        let fused = rrf(&[vec![a, b, c], vec![a, c]], 3);
        assert_eq!(fused.iter().map(|f| f.0).collect::<Vec<_>>(), vec![a, c, b]);
        assert!((fused[0].1 - 1.0).abs() < 1e-6);
        assert!(fused[2].1 < fused[1].1);
        assert_eq!(rrf(&[vec![a, b], vec![]], 1).len(), 1);
    }

    #[test]
    fn bm25_terms_are_stemmed_and_shared_between_query_and_document() {
        let d = document("The deployments of INC-48213 failed twice");
        let q = query("deployment inc-48213");
        assert!(!q.indices.is_empty());
        for i in &q.indices {
            assert!(d.indices.contains(i), "query term {i} not in the document's terms");
        }
        assert!(query("the of").indices.is_empty(), "stopwords carry no terms");
    }
}
