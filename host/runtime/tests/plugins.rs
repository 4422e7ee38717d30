//! The first-party plugins (plugins/), run in the real sandbox.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::{context, f32_tensor, f32s, load, runtime};
use weft_core::{DataType, NamedTensor, Tensor};
use weft_runtime::Plugin;

fn plugin(name: &str) -> Plugin {
    load(&runtime(), name)
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
}

#[tokio::test]
async fn normalize_zscores_rows_and_scales_with_params() {
    let normalize = plugin("normalize");
    let x = NamedTensor::new("x", f32_tensor(vec![2, 2], &[1.0, 3.0, 10.0, 10.0]));
    let out = normalize
        .transform(&context(&[]), vec![x.clone()])
        .await
        .unwrap();
    assert!(
        close(&f32s(&out[0].tensor), &[-1.0, 1.0, 0.0, 0.0]),
        "{:?}",
        f32s(&out[0].tensor)
    );
    let out = normalize
        .transform(&context(&[("mean", "2"), ("std", "4")]), vec![x.clone()])
        .await
        .unwrap();
    assert!(close(&f32s(&out[0].tensor), &[-0.25, 0.25, 2.0, 2.0]));
    let out = normalize
        .transform(
            &context(&[("mode", "scale"), ("scale", "2"), ("shift", "1")]),
            vec![x.clone()],
        )
        .await
        .unwrap();
    assert!(close(&f32s(&out[0].tensor), &[3.0, 7.0, 21.0, 21.0]));
    let bad = normalize
        .transform(&context(&[("mode", "cube")]), vec![x])
        .await
        .unwrap_err();
    assert_eq!(bad.error.kind(), weft_core::ErrorKind::InvalidArgument);
    assert!(bad.to_string().contains("unknown mode 'cube'"), "{bad}");
}

#[tokio::test]
async fn softmax_gives_probabilities_and_top_k_labels() {
    let softmax = plugin("softmax");
    let logits = NamedTensor::new("y", f32_tensor(vec![1, 3], &[1.0, 3.0, 2.0]));
    let out = softmax
        .transform(&context(&[]), vec![logits.clone()])
        .await
        .unwrap();
    let probabilities = f32s(&out[0].tensor);
    assert!((probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    assert!(
        close(&probabilities, &[0.09003057, 0.66524096, 0.24472847]),
        "{probabilities:?}"
    );
    let out = softmax
        .transform(
            &context(&[("top_k", "2"), ("labels", "cat, dog, eel")]),
            vec![logits],
        )
        .await
        .unwrap();
    let labels = out.iter().find(|o| o.name == "labels").unwrap();
    assert_eq!(labels.tensor.shape(), &[1, 2]);
    let names: Vec<&[u8]> = weft_core::bytes_elements(labels.tensor.data())
        .unwrap()
        .collect();
    assert_eq!(names, vec![&b"dog"[..], b"eel"]);
    let scores = out.iter().find(|o| o.name == "scores").unwrap();
    assert!(close(&f32s(&scores.tensor), &[0.66524096, 0.24472847]));
}

#[tokio::test]
async fn mean_combine_takes_the_weighted_mean_of_branches() {
    let combine = plugin("mean_combine");
    let branch = |name: &str, values: &[f32]| {
        (
            name.to_string(),
            vec![NamedTensor::new("y", f32_tensor(vec![1, 2], values))],
        )
    };
    let branches = vec![branch("a", &[1.0, 2.0]), branch("b", &[3.0, 6.0])];
    let out = combine
        .combine(&context(&[]), branches.clone())
        .await
        .unwrap();
    assert!(close(&f32s(&out[0].tensor), &[2.0, 4.0]));
    let out = combine
        .combine(&context(&[("weight.b", "3")]), branches)
        .await
        .unwrap();
    assert!(close(&f32s(&out[0].tensor), &[2.5, 5.0]));
    let mismatched = vec![
        branch("a", &[1.0, 2.0]),
        (
            "b".to_string(),
            vec![NamedTensor::new("y", f32_tensor(vec![2], &[1.0, 2.0]))],
        ),
    ];
    assert!(
        combine
            .combine(&context(&[]), mismatched)
            .await
            .unwrap_err()
            .to_string()
            .contains("different shapes")
    );
}

#[tokio::test]
async fn param_router_follows_the_request_parameter_with_a_default() {
    let router = plugin("param_router");
    assert_eq!(
        router
            .route(
                &context(&[("request.route", "canary"), ("default", "stable")]),
                vec![]
            )
            .await
            .unwrap(),
        "canary"
    );
    assert_eq!(
        router
            .route(&context(&[("default", "stable")]), vec![])
            .await
            .unwrap(),
        "stable"
    );
    assert_eq!(
        router
            .route(&context(&[("key", "arm"), ("request.arm", "b")]), vec![])
            .await
            .unwrap(),
        "b"
    );
    let failure = router.route(&context(&[]), vec![]).await.unwrap_err();
    assert!(
        failure
            .to_string()
            .contains("no parameter 'route' and no default"),
        "{failure}"
    );
}

#[tokio::test]
async fn tokenize_turns_text_into_int64_ids() {
    let tokenize = plugin("tokenize");
    let text = weft_core::encode_bytes_elements([&b"Hello brave world"[..], b"world"]).unwrap();
    let input = NamedTensor::new(
        "text",
        Tensor::new(DataType::Bytes, vec![2], Bytes::from(text)).unwrap(),
    );
    let out = tokenize
        .transform(
            &context(&[("vocab", "hello,world"), ("max_len", "4")]),
            vec![input],
        )
        .await
        .unwrap();
    assert_eq!(out[0].name, "ids");
    assert_eq!(out[0].tensor.datatype(), DataType::Int64);
    assert_eq!(out[0].tensor.shape(), &[2, 4]);
    let ids: Vec<i64> = out[0]
        .tensor
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(ids, vec![2, 1, 3, 0, 3, 0, 0, 0]);
}
