//! Models built with the crate's own prost messages, encoded, and checked from bytes.

use super::*;
use crate::proto::{
    AttributeProto, FunctionProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    SparseTensorProto, StringStringEntryProto, TensorProto, TrainingInfoProto,
};

const FLOAT: i32 = 1;
const INT64: i32 = 7;

fn weights(name: &str, n: usize) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: vec![n as i64],
        data_type: FLOAT,
        raw_data: Bytes::from(vec![0u8; n * 4]),
        ..Default::default()
    }
}

fn external(name: &str, location: &str) -> TensorProto {
    let entry = |k: &str, v: &str| StringStringEntryProto {
        key: k.into(),
        value: v.into(),
    };
    TensorProto {
        name: name.into(),
        dims: vec![4],
        data_type: FLOAT,
        data_location: proto::DATA_LOCATION_EXTERNAL,
        external_data: vec![
            entry("location", location),
            entry("offset", "0"),
            entry("length", "16"),
        ],
        ..Default::default()
    }
}

fn node(op: &str, name: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: vec!["x".into()],
        output: vec!["y".into()],
        attribute,
        ..Default::default()
    }
}

fn attr_t(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: 4,
        t: Some(t),
        ..Default::default()
    }
}

fn attr_g(name: &str, g: GraphProto) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: 5,
        g: Some(g),
        ..Default::default()
    }
}

fn graph(name: &str, node: Vec<NodeProto>, initializer: Vec<TensorProto>) -> GraphProto {
    GraphProto {
        name: name.into(),
        node,
        initializer,
        ..Default::default()
    }
}

fn opset(domain: &str, version: i64) -> OperatorSetIdProto {
    OperatorSetIdProto {
        domain: domain.into(),
        version,
    }
}

fn model(graph: GraphProto) -> ModelProto {
    ModelProto {
        ir_version: 8,
        opset_import: vec![opset("", 17)],
        graph: Some(graph),
        ..Default::default()
    }
}

/// A clean two-node model: Add(x, w0) -> Relu.
fn clean_graph() -> GraphProto {
    graph(
        "main",
        vec![node("Add", "add0", vec![]), node("Relu", "relu0", vec![])],
        vec![weights("w0", 4)],
    )
}

fn check(m: &ModelProto) -> Result<ModelSummary, CheckError> {
    check_model(&Bytes::from(m.encode_to_vec()), &ModelLimits::default())
}

fn refused_with(m: &ModelProto, limits: &ModelLimits) -> String {
    match check_model(&Bytes::from(m.encode_to_vec()), limits) {
        Ok(s) => panic!("model was accepted ({s:?}) but should be refused"),
        Err(e) => e.message().to_owned(),
    }
}

fn refused(m: &ModelProto) -> String {
    refused_with(m, &ModelLimits::default())
}

fn assert_external(msg: &str, tensor: &str, at: &str) {
    let tensor = match tensor {
        "<unnamed>" => tensor.to_owned(),
        named => format!("'{named}'"),
    };
    assert!(
        msg.starts_with(&format!("tensor {tensor} in {at} uses external data")),
        "unexpected message: {msg}"
    );
    assert!(msg.contains("external data is refused"), "{msg}");
}

#[test]
fn clean_model_passes_with_summary() {
    let s = check(&model(clean_graph())).unwrap();
    assert_eq!(
        s,
        ModelSummary {
            initializer_bytes: 16,
            nodes: 2,
            graphs: 1,
            max_depth: 0
        }
    );
}

#[test]
fn typed_arrays_and_strings_are_counted_at_element_width() {
    let mut g = clean_graph();
    g.initializer = vec![
        TensorProto {
            name: "i64".into(),
            dims: vec![3],
            data_type: INT64,
            int64_data: vec![1, 2, 3],
            ..Default::default()
        },
        TensorProto {
            name: "f".into(),
            dims: vec![2],
            data_type: FLOAT,
            float_data: vec![1.0, 2.0],
            ..Default::default()
        },
        TensorProto {
            name: "s".into(),
            dims: vec![2],
            data_type: 8,
            string_data: vec![b"abc".to_vec(), b"de".to_vec()],
            ..Default::default()
        },
        TensorProto {
            name: "d".into(),
            dims: vec![1],
            data_type: 11,
            double_data: vec![1.0],
            ..Default::default()
        },
    ];
    assert_eq!(check(&model(g)).unwrap().initializer_bytes, 24 + 8 + 5 + 8);
}

#[test]
fn external_initializer_absolute_path_is_refused() {
    let mut g = clean_graph();
    g.initializer = vec![external("w0", "/var/lib/weft/state.json")];
    let msg = refused(&model(g));
    assert_eq!(
        msg,
        "tensor 'w0' in graph 'main' initializer uses external data (it names a file outside \
         the model); external data is refused: embed the weights in the model"
    );
}

#[test]
fn external_initializer_relative_path_is_refused() {
    let mut g = clean_graph();
    g.initializer = vec![external("w0", "etc/passwd")];
    let msg = refused(&model(g));
    assert_eq!(
        msg,
        "tensor 'w0' in graph 'main' initializer uses external data (it names a file outside \
         the model); external data is refused: embed the weights in the model"
    );
}

#[test]
fn external_initializer_climbing_path_is_refused() {
    let mut g = clean_graph();
    g.initializer = vec![external("w0", "../../../etc/hostname")];
    let msg = refused(&model(g));
    assert_external(&msg, "w0", "graph 'main' initializer");
    assert!(
        !msg.contains("etc/hostname"),
        "the path is not echoed: {msg}"
    );
}

#[test]
fn data_location_external_without_entries_is_refused() {
    let mut g = clean_graph();
    let mut t = external("", "x");
    t.external_data.clear();
    g.initializer = vec![t];
    let msg = refused(&model(g));
    assert_external(&msg, "<unnamed>", "graph 'main' initializer");
    assert!(msg.contains("(no location given)"), "{msg}");
}

#[test]
fn external_data_entries_without_data_location_are_refused() {
    let mut g = clean_graph();
    let mut t = external("w0", "/etc/shadow");
    t.data_location = proto::DATA_LOCATION_DEFAULT;
    g.initializer = vec![t];
    assert_external(&refused(&model(g)), "w0", "graph 'main' initializer");
}

#[test]
fn unknown_data_location_is_refused() {
    let mut g = clean_graph();
    g.initializer[0].data_location = 7;
    assert!(refused(&model(g)).contains("unknown data_location 7"));
}

#[test]
fn external_sparse_initializer_values_are_refused() {
    let mut g = clean_graph();
    g.sparse_initializer = vec![SparseTensorProto {
        values: Some(external("sv", "/etc/passwd")),
        indices: Some(weights("si", 1)),
        dims: vec![8],
    }];
    assert_external(
        &refused(&model(g)),
        "sv",
        "graph 'main' sparse_initializer values",
    );
}

#[test]
fn external_sparse_initializer_indices_are_refused() {
    let mut g = clean_graph();
    g.sparse_initializer = vec![SparseTensorProto {
        values: Some(weights("sv", 1)),
        indices: Some(external("si", "/etc/passwd")),
        dims: vec![8],
    }];
    assert_external(
        &refused(&model(g)),
        "si",
        "graph 'main' sparse_initializer indices",
    );
}

#[test]
fn external_constant_node_value_is_refused() {
    let mut g = clean_graph();
    g.node.push(node(
        "Constant",
        "c0",
        vec![attr_t("value", external("cv", "/etc/passwd"))],
    ));
    assert_external(
        &refused(&model(g)),
        "cv",
        "graph 'main' > node 'c0' (Constant) attribute 'value'",
    );
}

#[test]
fn external_constant_of_shape_value_is_refused() {
    let mut g = clean_graph();
    g.node.push(node(
        "ConstantOfShape",
        "",
        vec![attr_t("value", external("fill", "../secret"))],
    ));
    assert_external(
        &refused(&model(g)),
        "fill",
        "graph 'main' > node <unnamed> (ConstantOfShape) attribute 'value'",
    );
}

#[test]
fn external_tensor_in_attribute_tensor_list_is_refused() {
    let mut g = clean_graph();
    g.node.push(node(
        "Custom",
        "n",
        vec![AttributeProto {
            name: "tables".into(),
            tensors: vec![weights("ok", 1), external("bad", "/etc/passwd")],
            ..Default::default()
        }],
    ));
    assert_external(
        &refused(&model(g)),
        "bad",
        "graph 'main' > node 'n' (Custom) attribute 'tables'[1]",
    );
}

#[test]
fn external_sparse_tensor_attribute_is_refused() {
    let mut g = clean_graph();
    g.node.push(node(
        "Constant",
        "c",
        vec![AttributeProto {
            name: "sparse_value".into(),
            sparse_tensor: Some(SparseTensorProto {
                values: Some(external("v", "/etc/passwd")),
                indices: None,
                dims: vec![4],
            }),
            ..Default::default()
        }],
    ));
    assert_external(
        &refused(&model(g)),
        "v",
        "graph 'main' > node 'c' (Constant) attribute 'sparse_value' values",
    );
}

#[test]
fn external_initializer_in_if_then_branch_is_refused() {
    let then = graph(
        "then",
        vec![node("Identity", "id", vec![])],
        vec![external("tw", "/etc/passwd")],
    );
    let els = graph("else", vec![node("Identity", "id2", vec![])], vec![]);
    let mut g = clean_graph();
    g.node.push(node(
        "If",
        "if0",
        vec![attr_g("then_branch", then), attr_g("else_branch", els)],
    ));
    assert_external(
        &refused(&model(g)),
        "tw",
        "graph 'main' > node 'if0' (If) attribute 'then_branch' > graph 'then' initializer",
    );
}

#[test]
fn external_tensor_in_loop_body_nested_two_levels_is_refused() {
    let inner = graph(
        "inner",
        vec![node(
            "Constant",
            "k",
            vec![attr_t("value", external("deep", "/root/.ssh/id_ed25519"))],
        )],
        vec![],
    );
    let outer = graph(
        "outer",
        vec![node("Loop", "loop1", vec![attr_g("body", inner)])],
        vec![],
    );
    let mut g = clean_graph();
    g.node
        .push(node("Loop", "loop0", vec![attr_g("body", outer)]));
    assert_external(
        &refused(&model(g)),
        "deep",
        "graph 'main' > node 'loop0' (Loop) attribute 'body' > graph 'outer' > node 'loop1' \
         (Loop) attribute 'body' > graph 'inner' > node 'k' (Constant) attribute 'value'",
    );
}

#[test]
fn external_tensor_in_attribute_graph_list_is_refused() {
    let sub = graph("branch1", vec![], vec![external("b", "/etc/passwd")]);
    let mut g = clean_graph();
    g.node.push(node(
        "Custom",
        "sw",
        vec![AttributeProto {
            name: "branches".into(),
            graphs: vec![graph("branch0", vec![], vec![]), sub],
            ..Default::default()
        }],
    ));
    assert_external(
        &refused(&model(g)),
        "b",
        "graph 'main' > node 'sw' (Custom) attribute 'branches'[1] > graph 'branch1' initializer",
    );
}

fn local_function(node: Vec<NodeProto>, attribute_proto: Vec<AttributeProto>) -> FunctionProto {
    FunctionProto {
        name: "MyFn".into(),
        domain: "local.fns".into(),
        input: vec!["x".into()],
        output: vec!["y".into()],
        node,
        attribute_proto,
        opset_import: vec![opset("", 17)],
        ..Default::default()
    }
}

fn model_calling_function(f: FunctionProto) -> ModelProto {
    let mut g = clean_graph();
    let mut call = node("MyFn", "call0", vec![]);
    call.domain = "local.fns".into();
    g.node.push(call);
    let mut m = model(g);
    m.opset_import.push(opset("local.fns", 1));
    m.functions = vec![f];
    m
}

#[test]
fn external_tensor_in_function_node_attribute_is_refused() {
    let f = local_function(
        vec![node(
            "Constant",
            "fc",
            vec![attr_t("value", external("fw", "/etc/passwd"))],
        )],
        vec![],
    );
    assert_external(
        &refused(&model_calling_function(f)),
        "fw",
        "function 'MyFn' (domain 'local.fns') > node 'fc' (Constant) attribute 'value'",
    );
}

#[test]
fn external_tensor_in_function_attribute_default_is_refused() {
    let f = local_function(
        vec![],
        vec![attr_t("alpha", external("def", "/etc/passwd"))],
    );
    assert_external(
        &refused(&model_calling_function(f)),
        "def",
        "function 'MyFn' (domain 'local.fns') attribute default 'alpha'",
    );
}

#[test]
fn external_tensor_in_training_info_initialization_is_refused() {
    let mut m = model(clean_graph());
    m.training_info = vec![TrainingInfoProto {
        initialization: Some(graph("init", vec![], vec![external("ti", "/etc/passwd")])),
        algorithm: Some(graph("algo", vec![], vec![])),
    }];
    assert_external(
        &refused(&m),
        "ti",
        "training_info[0] initialization > graph 'init' initializer",
    );
}

#[test]
fn allow_external_data_lets_external_model_pass() {
    let mut g = clean_graph();
    g.initializer = vec![external("w0", "weights.bin")];
    let limits = ModelLimits {
        allow_external_data: true,
        ..ModelLimits::default()
    };
    let s = check_model(&Bytes::from(model(g).encode_to_vec()), &limits).unwrap();
    // Counted at its declared size: 4 floats.
    assert_eq!(s.initializer_bytes, 16);
}

#[test]
fn custom_op_domain_is_refused() {
    let mut g = clean_graph();
    let mut evil = node("ReadFile", "rf", vec![]);
    evil.domain = "com.evil.customops".into();
    g.node.push(evil);
    let msg = refused(&model(g));
    assert!(
        msg.starts_with(
            "graph 'main' > node 'rf' (ReadFile) uses operator domain 'com.evil.customops', which \
             this server does not serve (allowed: '', 'ai.onnx', 'ai.onnx.ml', 'com.microsoft')"
        ),
        "{msg}"
    );
}

#[test]
fn custom_opset_import_is_refused() {
    let mut m = model(clean_graph());
    m.opset_import.push(opset("com.evil.customops", 1));
    let msg = refused(&m);
    assert!(
        msg.starts_with("the model imports opset domain 'com.evil.customops' (version 1)"),
        "{msg}"
    );
}

#[test]
fn model_local_function_domain_is_allowed() {
    let f = local_function(
        vec![node("Relu", "r", vec![])],
        vec![attr_t("alpha", weights("a", 1))],
    );
    let s = check(&model_calling_function(f)).unwrap();
    assert_eq!(s.nodes, 4);
    assert_eq!(s.initializer_bytes, 20);
}

#[test]
fn function_domain_node_naming_no_function_is_refused() {
    let mut m = model_calling_function(local_function(vec![], vec![]));
    if let Some(g) = m.graph.as_mut() {
        g.node[2].op_type = "NotAFunction".into();
    }
    let msg = refused(&m);
    assert!(msg.contains("no function of that name"), "{msg}");
}

#[test]
fn default_domain_alias_is_allowed() {
    let mut g = clean_graph();
    g.node[0].domain = "ai.onnx".into();
    let mut m = model(g);
    m.opset_import = vec![opset("ai.onnx", 17), opset("com.microsoft", 1)];
    assert!(check(&m).is_ok());
}

#[test]
fn initializer_bytes_over_limit_is_refused() {
    let limits = ModelLimits {
        max_initializer_bytes: 15,
        ..ModelLimits::default()
    };
    let msg = refused_with(&model(clean_graph()), &limits);
    assert!(msg.contains("max_initializer_bytes = 15"), "{msg}");
    assert!(
        msg.starts_with("tensor 'w0' in graph 'main' initializer brings"),
        "{msg}"
    );
}

#[test]
fn declared_shape_counts_against_byte_limit() {
    let mut g = clean_graph();
    // Claims 2^40 floats with no data: counted at its declared size.
    g.initializer = vec![TensorProto {
        name: "huge".into(),
        dims: vec![1 << 20, 1 << 20],
        data_type: FLOAT,
        ..Default::default()
    }];
    assert!(refused(&model(g)).contains("max_initializer_bytes = 1073741824"));
}

#[test]
fn node_count_over_limit_is_refused() {
    let limits = ModelLimits {
        max_nodes: 1,
        ..ModelLimits::default()
    };
    let msg = refused_with(&model(clean_graph()), &limits);
    assert!(msg.contains("max_nodes = 1"), "{msg}");
    assert!(msg.contains("node 'relu0'"), "{msg}");
}

/// `levels` If nodes, each holding the next in its then_branch, built iteratively.
fn nested_ifs(levels: usize) -> ModelProto {
    let mut inner = graph("leaf", vec![node("Identity", "leaf", vec![])], vec![]);
    for i in 0..levels {
        inner = graph(
            &format!("g{i}"),
            vec![node(
                "If",
                &format!("if{i}"),
                vec![attr_g("then_branch", inner)],
            )],
            vec![],
        );
    }
    inner.name = "main".into();
    model(inner)
}

#[test]
fn subgraph_depth_over_limit_is_refused() {
    let ok = check(&nested_ifs(16)).unwrap();
    assert_eq!(ok.max_depth, 16);
    assert_eq!(ok.graphs, 17);
    let msg = refused(&nested_ifs(17));
    assert!(
        msg.starts_with("subgraphs nest deeper than the limit max_subgraph_depth = 16"),
        "{msg}"
    );
}

#[test]
fn deeply_nested_model_is_refused_without_overflow() {
    let msg = refused(&nested_ifs(200));
    assert!(msg.contains("deeper than the decoder allows"), "{msg}");
}

#[test]
fn garbage_bytes_are_refused() {
    let e = check_model(
        &Bytes::from_static(b"\xff\xff\xff\xff not a model"),
        &ModelLimits::default(),
    )
    .unwrap_err();
    assert!(
        e.message()
            .starts_with("the bytes are not a valid ONNX model"),
        "{e}"
    );
}

#[test]
fn model_without_graph_is_refused() {
    let m = ModelProto {
        ir_version: 8,
        ..Default::default()
    };
    assert!(refused(&m).contains("has no graph"));
}

#[test]
fn error_maps_to_invalid_argument() {
    let mut g = clean_graph();
    g.initializer = vec![external("w0", "/etc/passwd")];
    let e: weft_core::Error = check_model(
        &Bytes::from(model(g).encode_to_vec()),
        &ModelLimits::default(),
    )
    .unwrap_err()
    .into();
    assert_eq!(e.kind(), weft_core::ErrorKind::InvalidArgument);
}

#[test]
fn raw_data_is_not_copied_on_decode() {
    let bytes = Bytes::from(model(clean_graph()).encode_to_vec());
    let m = ModelProto::decode(bytes.clone()).unwrap();
    let raw = &m.graph.unwrap().initializer[0].raw_data;
    let range = bytes.as_ptr() as usize..bytes.as_ptr() as usize + bytes.len();
    assert!(range.contains(&(raw.as_ptr() as usize)));
}
