//! Qdrant's protobuf types <-> qdrant-edge's types, for the parts the test server serves: point
//! ids, payloads, dense and sparse vectors, `must` filters of exact matches and numeric ranges,
//! payload selection. Anything else a request carries is refused with `InvalidArgument` naming
//! it (never dropped). Must not: touch a shard.

use qdrant_client::qdrant as pb;
use qdrant_edge::external::ordered_float::OrderedFloat;
use qdrant_edge::external::uuid::Uuid;
use qdrant_edge::{
    Condition, FieldCondition, Filter, JsonPath, Match, PointId, Range, SparseVector, Vector, VectorInternal,
    WithPayloadInterface,
};
use serde_json::{Map, Value};
use std::collections::HashMap;
use tonic::Status;

/// The refusal for a request field this server does not honour.
pub fn unsupported(what: &str) -> Status {
    Status::invalid_argument(format!("the test gRPC server over qdrant-edge does not support `{what}`"))
}

/// Refuses the request if any of the named optional fields is set.
macro_rules! refuse_set {
    ($req:expr; $($field:ident),+ $(,)?) => {
        $(if $req.$field.is_some() {
            return Err($crate::convert::unsupported(stringify!($field)));
        })+
    };
}
pub(crate) use refuse_set;

/// Writes are applied and flushed before the answer, always; a client asking for less is told.
pub fn require_wait(wait: Option<bool>) -> Result<(), Status> {
    match wait {
        Some(true) => Ok(()),
        _ => Err(Status::invalid_argument(
            "the test gRPC server over qdrant-edge only does synchronous writes: send `wait: true`",
        )),
    }
}

pub fn point_id(id: Option<pb::PointId>) -> Result<PointId, Status> {
    match id.and_then(|i| i.point_id_options) {
        Some(pb::point_id::PointIdOptions::Uuid(s)) => {
            Uuid::parse_str(&s).map(PointId::Uuid).map_err(|_| Status::invalid_argument(format!("`{s}` is not a UUID")))
        }
        Some(pb::point_id::PointIdOptions::Num(n)) => Ok(PointId::NumId(n)),
        None => Err(Status::invalid_argument("a point id is missing")),
    }
}

pub fn proto_id(id: PointId) -> pb::PointId {
    let options = match id {
        PointId::Uuid(u) => pb::point_id::PointIdOptions::Uuid(u.to_string()),
        PointId::NumId(n) => pb::point_id::PointIdOptions::Num(n),
    };
    pb::PointId { point_id_options: Some(options) }
}

pub fn payload_in(p: HashMap<String, pb::Value>) -> Map<String, Value> {
    Map::from(qdrant_client::Payload::from(p))
}

pub fn payload_out(p: Option<qdrant_edge::Payload>) -> HashMap<String, pb::Value> {
    p.map(|p| qdrant_client::Payload::from(p.0).into()).unwrap_or_default()
}

/// A stored vector: the `vector` oneof, or the deprecated `data` (+ `indices`) fields.
#[allow(deprecated)]
pub fn vector(v: pb::Vector) -> Result<Vector, Status> {
    match v.vector {
        Some(pb::vector::Vector::Dense(d)) => Ok(Vector::new_dense(d.data)),
        Some(pb::vector::Vector::Sparse(s)) => sparse(s.indices, s.values).map(|s| Vector(VectorInternal::Sparse(s))),
        Some(_) => Err(unsupported("multi-dense, document, image and object vectors")),
        None if v.vectors_count.is_some() => Err(unsupported("vectors_count")),
        None => match v.indices {
            Some(idx) => sparse(idx.data, v.data).map(|s| Vector(VectorInternal::Sparse(s))),
            None => Ok(Vector::new_dense(v.data)),
        },
    }
}

pub fn sparse(indices: Vec<u32>, values: Vec<f32>) -> Result<SparseVector, Status> {
    SparseVector::new(indices, values).map_err(|e| Status::invalid_argument(format!("sparse vector: {e}")))
}

/// A point's vectors by name (`""` is the unnamed one).
pub fn vectors(v: Option<pb::Vectors>) -> Result<HashMap<String, Vector>, Status> {
    match v.and_then(|v| v.vectors_options) {
        Some(pb::vectors::VectorsOptions::Vector(v)) => Ok(HashMap::from([(String::new(), vector(v)?)])),
        Some(pb::vectors::VectorsOptions::Vectors(named)) => {
            named.vectors.into_iter().map(|(name, v)| Ok((name, vector(v)?))).collect()
        }
        None => Err(Status::invalid_argument("a point has no vectors")),
    }
}

/// `with_payload`: all or nothing (include/exclude lists are not served).
pub fn with_payload(w: Option<pb::WithPayloadSelector>) -> Result<bool, Status> {
    match w.and_then(|w| w.selector_options) {
        None => Ok(false),
        Some(pb::with_payload_selector::SelectorOptions::Enable(b)) => Ok(b),
        Some(_) => Err(unsupported("with_payload include/exclude")),
    }
}

pub fn payload_interface(w: Option<pb::WithPayloadSelector>) -> Result<WithPayloadInterface, Status> {
    with_payload(w).map(WithPayloadInterface::Bool)
}

/// Vectors are never returned (nothing kiln asks for needs them).
pub fn refuse_with_vectors(w: &Option<pb::WithVectorsSelector>) -> Result<(), Status> {
    match w.as_ref().and_then(|w| w.selector_options.as_ref()) {
        None | Some(pb::with_vectors_selector::SelectorOptions::Enable(false)) => Ok(()),
        Some(_) => Err(unsupported("with_vectors")),
    }
}

/// A filter of `must` conditions, each an exact match (keyword, integer, bool) or a range.
pub fn filter(f: Option<pb::Filter>) -> Result<Option<Filter>, Status> {
    let Some(f) = f else { return Ok(None) };
    if !f.should.is_empty() || !f.must_not.is_empty() || f.min_should.is_some() {
        return Err(unsupported("filter should / must_not / min_should"));
    }
    let must = f.must.into_iter().map(condition).collect::<Result<Vec<_>, _>>()?;
    Ok(Some(Filter { must: Some(must), ..Default::default() }))
}

fn condition(c: pb::Condition) -> Result<Condition, Status> {
    let Some(pb::condition::ConditionOneOf::Field(fc)) = c.condition_one_of else {
        return Err(unsupported("conditions other than field conditions"));
    };
    refuse_set!(fc; geo_bounding_box, geo_radius, values_count, geo_polygon, datetime_range, is_empty, is_null);
    let key: JsonPath = fc.key.parse().map_err(|_| Status::invalid_argument(format!("bad field `{}`", fc.key)))?;
    match (fc.r#match, fc.range) {
        (Some(m), None) => Ok(Condition::Field(FieldCondition::new_match(key, match_value(m)?))),
        (None, Some(r)) => Ok(Condition::Field(FieldCondition::new_range(key, range(r)))),
        _ => {
            Err(Status::invalid_argument(format!("field condition on `{}` needs exactly one of match, range", fc.key)))
        }
    }
}

fn match_value(m: pb::Match) -> Result<Match, Status> {
    use pb::r#match::MatchValue;
    match m.match_value {
        Some(MatchValue::Keyword(s)) => Ok(Match::from(s)),
        Some(MatchValue::Integer(i)) => Ok(Match::from(i)),
        Some(MatchValue::Boolean(b)) => Ok(Match::from(b)),
        Some(_) => Err(unsupported("matches other than keyword, integer and boolean")),
        None => Err(Status::invalid_argument("empty match")),
    }
}

fn range(r: pb::Range) -> Range<OrderedFloat<f64>> {
    Range {
        lt: r.lt.map(OrderedFloat),
        gt: r.gt.map(OrderedFloat),
        gte: r.gte.map(OrderedFloat),
        lte: r.lte.map(OrderedFloat),
    }
}

/// A response's point as Qdrant sends it (payload, no vectors).
pub fn retrieved(id: PointId, payload: Option<qdrant_edge::Payload>) -> pb::RetrievedPoint {
    pb::RetrievedPoint { id: Some(proto_id(id)), payload: payload_out(payload), ..Default::default() }
}

pub fn scored(p: qdrant_edge::ScoredPoint) -> pb::ScoredPoint {
    pb::ScoredPoint {
        id: Some(proto_id(p.id)),
        payload: payload_out(p.payload),
        score: p.score,
        version: p.version,
        ..Default::default()
    }
}

/// An engine error as the status Qdrant's own server gives it: the caller's mistake
/// (`InvalidArgument`), a missing point (`NotFound`), or the server's own failure (`Internal`).
pub fn engine_error(what: &str) -> impl FnOnce(qdrant_edge::OperationError) -> Status + '_ {
    use qdrant_edge::OperationError as E;
    move |e| match e {
        E::PointIdError { .. } => Status::not_found(format!("{what}: {e}")),
        E::WrongVectorDimension { .. }
        | E::VectorNameNotExists { .. }
        | E::TypeError { .. }
        | E::ValidationError { .. }
        | E::WrongSparse
        | E::WrongMulti => Status::invalid_argument(format!("{what}: {e}")),
        E::Timeout { .. } => Status::deadline_exceeded(format!("{what}: {e}")),
        _ => Status::internal(format!("{what}: {e}")),
    }
}
