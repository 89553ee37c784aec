//! The test gRPC server over qdrant-edge through the official client: it names itself, serves a
//! write/read round trip, and refuses what it does not honour (writes without `wait`, filters
//! beyond `must`, prefetch, RPCs it does not serve) instead of ignoring it; a missing point is
//! `NotFound`, as on Qdrant.

use anyhow::{ensure, Result};
use kiln_qdrant_testserver::TestServer;
use qdrant_client::qdrant::points_selector::PointsSelectorOneOf;
use qdrant_client::qdrant::{
    vectors_config, with_payload_selector, Condition, CountPoints, CreateCollection, Distance, Filter, PointStruct,
    PointsIdsList, PointsSelector, PrefetchQuery, Query, QueryPoints, SetPayloadPoints, UpsertPoints, VectorParams,
    VectorsConfig, WithPayloadSelector,
};
use qdrant_client::{Qdrant, QdrantError};
use tonic::Code;

fn code(r: Result<impl std::fmt::Debug, QdrantError>) -> Option<(Code, String)> {
    match r {
        Err(QdrantError::ResponseError { status }) => Some((status.code(), status.message().to_string())),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_and_refusals() -> Result<()> {
    let server = TestServer::start()?;
    let client = Qdrant::from_url(&server.url()).skip_compatibility_check().build()?;
    ensure!(client.health_check().await?.title.contains("not Qdrant"));

    let params = VectorParams { size: 3, distance: Distance::Cosine as i32, ..Default::default() };
    client
        .create_collection(CreateCollection {
            collection_name: "c".into(),
            vectors_config: Some(VectorsConfig { config: Some(vectors_config::Config::Params(params)) }),
            ..Default::default()
        })
        .await?;
    let point = |id: u64, v: Vec<f32>| PointStruct::new(id, v, [("n", (id as i64).into())]);
    let upsert = |wait| UpsertPoints {
        collection_name: "c".into(),
        wait,
        points: vec![point(1, vec![1.0, 0.0, 0.0]), point(2, vec![0.0, 1.0, 0.0])],
        ..Default::default()
    };
    let (c, m) = code(client.upsert_points(upsert(None)).await).unwrap_or((Code::Ok, String::new()));
    ensure!(c == Code::InvalidArgument && m.contains("wait"), "{c:?} {m}");
    client.upsert_points(upsert(Some(true))).await?;

    let all = WithPayloadSelector { selector_options: Some(with_payload_selector::SelectorOptions::Enable(true)) };
    let nearest = QueryPoints {
        collection_name: "c".into(),
        query: Some(Query::new_nearest(vec![0.9, 0.1, 0.0])),
        filter: Some(Filter::must([Condition::matches("n", 1i64)])),
        with_payload: Some(all),
        ..Default::default()
    };
    let got = client.query(nearest.clone()).await?.result;
    ensure!(got.len() == 1 && got[0].payload["n"].as_integer() == Some(1), "{got:?}");

    let should = QueryPoints { filter: Some(Filter::should([Condition::matches("n", 1i64)])), ..nearest.clone() };
    let (c, m) = code(client.query(should).await).unwrap_or((Code::Ok, String::new()));
    ensure!(c == Code::InvalidArgument && m.contains("should"), "{c:?} {m}");
    let prefetch = QueryPoints { prefetch: vec![PrefetchQuery::default()], ..nearest };
    ensure!(code(client.query(prefetch).await).map(|c| c.0) == Some(Code::InvalidArgument));
    let missing = SetPayloadPoints {
        collection_name: "c".into(),
        wait: Some(true),
        points_selector: Some(PointsSelector {
            points_selector_one_of: Some(PointsSelectorOneOf::Points(PointsIdsList { ids: vec![99.into()] })),
        }),
        ..Default::default()
    };
    ensure!(code(client.overwrite_payload(missing).await).map(|c| c.0) == Some(Code::NotFound));
    let count = client.count(CountPoints { collection_name: "c".into(), ..Default::default() }).await;
    ensure!(code(count).map(|c| c.0) == Some(Code::Unimplemented));
    Ok(())
}
