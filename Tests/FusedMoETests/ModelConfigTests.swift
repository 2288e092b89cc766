import Testing

@testable import FusedMoE

/// `config.json` as published for each model (fields the layer does not read trimmed where long).
enum ModelConfigSamples {
    static let mixtral8x7B = """
        {
          "architectures": ["MixtralForCausalLM"],
          "attention_dropout": 0.0,
          "bos_token_id": 1,
          "eos_token_id": 2,
          "hidden_act": "silu",
          "hidden_size": 4096,
          "initializer_range": 0.02,
          "intermediate_size": 14336,
          "max_position_embeddings": 32768,
          "model_type": "mixtral",
          "num_attention_heads": 32,
          "num_experts_per_tok": 2,
          "num_hidden_layers": 32,
          "num_key_value_heads": 8,
          "num_local_experts": 8,
          "output_router_logits": false,
          "rms_norm_eps": 1e-05,
          "rope_theta": 1000000.0,
          "router_aux_loss_coef": 0.02,
          "sliding_window": null,
          "tie_word_embeddings": false,
          "torch_dtype": "bfloat16",
          "transformers_version": "4.36.0.dev0",
          "use_cache": true,
          "vocab_size": 32000
        }
        """

    static let qwen3_30B_A3B = """
        {
          "architectures": ["Qwen3MoeForCausalLM"],
          "attention_bias": false,
          "attention_dropout": 0.0,
          "bos_token_id": 151643,
          "decoder_sparse_step": 1,
          "eos_token_id": 151645,
          "head_dim": 128,
          "hidden_act": "silu",
          "hidden_size": 2048,
          "initializer_range": 0.02,
          "intermediate_size": 6144,
          "max_position_embeddings": 40960,
          "max_window_layers": 48,
          "mlp_only_layers": [],
          "model_type": "qwen3_moe",
          "moe_intermediate_size": 768,
          "norm_topk_prob": true,
          "num_attention_heads": 32,
          "num_experts": 128,
          "num_experts_per_tok": 8,
          "num_hidden_layers": 48,
          "num_key_value_heads": 4,
          "output_router_logits": false,
          "rms_norm_eps": 1e-06,
          "rope_scaling": null,
          "rope_theta": 1000000.0,
          "router_aux_loss_coef": 0.001,
          "sliding_window": null,
          "tie_word_embeddings": false,
          "torch_dtype": "bfloat16",
          "transformers_version": "4.51.0",
          "use_cache": true,
          "use_sliding_window": false,
          "vocab_size": 151936
        }
        """

    static let qwen15MoE_A27B = """
        {
          "architectures": ["Qwen2MoeForCausalLM"],
          "attention_dropout": 0.0,
          "bos_token_id": 151643,
          "decoder_sparse_step": 1,
          "eos_token_id": 151643,
          "hidden_act": "silu",
          "hidden_size": 2048,
          "initializer_range": 0.02,
          "intermediate_size": 5632,
          "max_position_embeddings": 8192,
          "max_window_layers": 21,
          "model_type": "qwen2_moe",
          "moe_intermediate_size": 1408,
          "norm_topk_prob": false,
          "num_attention_heads": 16,
          "num_experts": 60,
          "num_experts_per_tok": 4,
          "num_hidden_layers": 24,
          "num_key_value_heads": 16,
          "output_router_logits": false,
          "rms_norm_eps": 1e-06,
          "rope_theta": 1000000.0,
          "router_aux_loss_coef": 0.001,
          "shared_expert_intermediate_size": 5632,
          "sliding_window": 32768,
          "tie_word_embeddings": false,
          "torch_dtype": "bfloat16",
          "transformers_version": "4.36.0.dev0",
          "use_cache": true,
          "use_sliding_window": false,
          "vocab_size": 151936
        }
        """

    static let deepSeekV3 = """
        {
          "architectures": ["DeepseekV3ForCausalLM"],
          "attention_bias": false,
          "attention_dropout": 0.0,
          "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"
          },
          "aux_loss_alpha": 0.001,
          "bos_token_id": 0,
          "eos_token_id": 1,
          "ep_size": 1,
          "first_k_dense_replace": 3,
          "hidden_act": "silu",
          "hidden_size": 7168,
          "initializer_range": 0.02,
          "intermediate_size": 18432,
          "kv_lora_rank": 512,
          "max_position_embeddings": 163840,
          "model_type": "deepseek_v3",
          "moe_intermediate_size": 2048,
          "moe_layer_freq": 1,
          "n_group": 8,
          "n_routed_experts": 256,
          "n_shared_experts": 1,
          "norm_topk_prob": true,
          "num_attention_heads": 128,
          "num_experts_per_tok": 8,
          "num_hidden_layers": 61,
          "num_key_value_heads": 128,
          "num_nextn_predict_layers": 1,
          "q_lora_rank": 1536,
          "qk_nope_head_dim": 128,
          "qk_rope_head_dim": 64,
          "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128]
          },
          "rms_norm_eps": 1e-06,
          "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn"
          },
          "rope_theta": 10000,
          "routed_scaling_factor": 2.5,
          "scoring_func": "sigmoid",
          "seq_aux": true,
          "tie_word_embeddings": false,
          "topk_group": 4,
          "topk_method": "noaux_tc",
          "torch_dtype": "bfloat16",
          "transformers_version": "4.33.1",
          "use_cache": true,
          "v_head_dim": 128,
          "vocab_size": 129280
        }
        """

    static let deepSeekV2Lite = """
        {
          "architectures": ["DeepseekV2ForCausalLM"],
          "aux_loss_alpha": 0.001,
          "first_k_dense_replace": 1,
          "hidden_act": "silu",
          "hidden_size": 2048,
          "intermediate_size": 10944,
          "kv_lora_rank": 512,
          "model_type": "deepseek_v2",
          "moe_intermediate_size": 1408,
          "moe_layer_freq": 1,
          "n_group": 1,
          "n_routed_experts": 64,
          "n_shared_experts": 2,
          "norm_topk_prob": false,
          "num_experts_per_tok": 6,
          "num_hidden_layers": 27,
          "q_lora_rank": null,
          "routed_scaling_factor": 1.0,
          "scoring_func": "softmax",
          "seq_aux": true,
          "topk_group": 1,
          "topk_method": "greedy",
          "torch_dtype": "bfloat16",
          "vocab_size": 102400
        }
        """

    static func parsed(_ text: String) -> JSON { try! JSON.parse(text, source: "config.json") }

    /// `json` with `key` replaced (or removed, for nil), at the top level.
    static func editing(_ json: JSON, _ key: String, _ value: JSON?) -> JSON {
        guard case .object(var members) = json else { return json }
        if let index = members.firstIndex(where: { $0.0 == key }) {
            if let value { members[index].1 = value } else { members.remove(at: index) }
        } else if let value {
            members.append((key, value))
        }
        return .object(members)
    }
}

@Suite struct ModelConfigTests {
    typealias Samples = ModelConfigSamples

    func config(_ text: String, tp: Int = 1, ep: Int = 1) throws -> MoEModelConfig {
        try MoEModelConfig(json: Samples.parsed(text), tensorParallel: tp, expertParallel: ep)
    }

    @Test func mixtral() throws {
        let whole = try config(Samples.mixtral8x7B)
        #expect(whole.family == .mixtral)
        #expect(whole.name == "MixtralForCausalLM")
        #expect(whole.shape == (try MoEShape(experts: 8, topK: 2, hidden: 4096, intermediate: 14336)))
        #expect(whole.routing == MoERoutingConfig(scoring: .softmax, renormalize: true))
        #expect(whole.activation == .silu)
        #expect(whole.expertMap == nil)
        let split = try config(Samples.mixtral8x7B, tp: 2)
        #expect(split.name == "MixtralForCausalLM tp=2")
        #expect(split.shape == (try ShapePreset.named("mixtral_tp2")).shape)
        #expect(split.globalIntermediate == 14336)
    }

    @Test func qwen3UsesTheExpertsIntermediateSize() throws {
        let whole = try config(Samples.qwen3_30B_A3B)
        #expect(whole.family == .qwenMoE)
        // intermediate_size (6144) is the dense MLP's; the experts' is moe_intermediate_size.
        #expect(whole.shape == (try MoEShape(experts: 128, topK: 8, hidden: 2048, intermediate: 768)))
        #expect(whole.routing.renormalize)
        #expect(whole.routing.scoring == .softmax)
        let split = try config(Samples.qwen3_30B_A3B, tp: 2)
        #expect(split.name == "Qwen3MoeForCausalLM tp=2")
        #expect(split.shape.intermediate == 384)
        #expect(split.preset == ShapePreset(name: "Qwen3MoeForCausalLM tp=2", shape: split.shape))
        for (tp, local) in [(4, 192), (8, 96), (16, 48), (32, 24), (96, 8)] {
            #expect(try config(Samples.qwen3_30B_A3B, tp: tp).shape.intermediate == local)
        }
    }

    @Test func qwen3ExpertParallelMapsRankZero() throws {
        let split = try config(Samples.qwen3_30B_A3B, tp: 2, ep: 4)
        #expect(split.name == "Qwen3MoeForCausalLM tp=2 ep=4")
        #expect(split.shape == (try MoEShape(experts: 32, topK: 8, hidden: 2048, intermediate: 384)))
        #expect(split.globalExperts == 128)
        let map = try #require(split.expertMap)
        #expect(map.count == 128)
        #expect(Array(map[0..<32]) == (0..<32).map { Int32($0) })
        #expect(map[32...].allSatisfy { $0 == -1 })
        #expect(split.options.expertMap == map)
        #expect(split.options.renormalize)
        try split.options.validate(localExperts: split.shape.experts)
        #expect(split.options.routedExperts(local: split.shape.experts) == 128)
        let rank3 = try #require(split.expertMap(rank: 3))
        #expect(rank3[96] == 0 && rank3[127] == 31 && rank3[95] == -1)
    }

    @Test func qwen2MoE() throws {
        let whole = try config(Samples.qwen15MoE_A27B)
        #expect(whole.family == .qwenMoE)
        #expect(whole.name == "Qwen2MoeForCausalLM")
        #expect(whole.shape == (try MoEShape(experts: 60, topK: 4, hidden: 2048, intermediate: 1408)))
        #expect(!whole.routing.renormalize)
        #expect(
            try config(Samples.qwen15MoE_A27B, tp: 16, ep: 4).shape
                == (try MoEShape(experts: 15, topK: 4, hidden: 2048, intermediate: 88)))
    }

    @Test func deepSeekV3() throws {
        let whole = try config(Samples.deepSeekV3)
        #expect(whole.family == .deepSeek)
        #expect(whole.name == "DeepseekV3ForCausalLM")
        #expect(whole.shape == (try MoEShape(experts: 256, topK: 8, hidden: 7168, intermediate: 2048)))
        #expect(
            whole.routing
                == MoERoutingConfig(
                    scoring: .sigmoid, renormalize: true, groups: 8, topKGroups: 4, scalingFactor: 2.5,
                    method: "noaux_tc"))
        #expect(whole.routing.description == "sigmoid top-k, renormalized, 4 of 8 groups, scaled by 2.5, noaux_tc")
        let split = try config(Samples.deepSeekV3, tp: 4)
        #expect(split.shape == (try ShapePreset.named("dsv3_tp4")).shape)
        let expertParallel = try config(Samples.deepSeekV3, ep: 8)
        #expect(expertParallel.shape.experts == 32)
        #expect(expertParallel.expertMap?.filter { $0 >= 0 }.count == 32)
    }

    @Test func deepSeekV2Lite() throws {
        let whole = try config(Samples.deepSeekV2Lite)
        #expect(whole.family == .deepSeek)
        #expect(whole.shape == (try MoEShape(experts: 64, topK: 6, hidden: 2048, intermediate: 1408)))
        #expect(whole.routing == MoERoutingConfig(scoring: .softmax, renormalize: false, method: "greedy"))
    }

    @Test(arguments: [Samples.mixtral8x7B, Samples.qwen3_30B_A3B, Samples.deepSeekV3])
    func familiesAreRecognisedByTheirKeysAlone(text: String) throws {
        var bare = Samples.editing(Samples.parsed(text), "model_type", nil)
        bare = Samples.editing(bare, "architectures", nil)
        let expected = try config(text)
        let recognised = try MoEModelConfig(json: bare)
        #expect(recognised.family == expected.family)
        #expect(recognised.shape == expected.shape)
        #expect(recognised.routing == expected.routing)
        // By architectures alone, too.
        let byArchitecture = try MoEModelConfig(json: Samples.editing(Samples.parsed(text), "model_type", nil))
        #expect(byArchitecture.name == expected.name)
    }

    @Test func textConfigOfAMultimodalModelIsRead() throws {
        let nested = JSON.object([
            ("architectures", .array([.string("Qwen3VLMoeForConditionalGeneration")])),
            ("model_type", .string("qwen3_vl_moe")),
            ("text_config", Samples.editing(Samples.parsed(Samples.qwen3_30B_A3B), "architectures", nil)),
            ("vision_config", .object([("hidden_size", .number(1152))])),
        ])
        let config = try MoEModelConfig(json: nested, tensorParallel: 2)
        #expect(config.family == .qwenMoE)
        #expect(config.name == "Qwen3VLMoeForConditionalGeneration tp=2")
        #expect(config.shape == (try MoEShape(experts: 128, topK: 8, hidden: 2048, intermediate: 384)))
    }

    /// The argument name of an `invalidArgument`, and its message.
    func failure(_ json: JSON, tp: Int = 1, ep: Int = 1) -> (name: String, message: String)? {
        let error = caughtError { _ = try MoEModelConfig(json: json, tensorParallel: tp, expertParallel: ep) }
        guard case .invalidArgument(let name, let message) = error else {
            Issue.record("expected invalidArgument, got \(String(describing: error))")
            return nil
        }
        return (name, message)
    }

    @Test func errorsNameTheField() throws {
        let qwen = Samples.parsed(Samples.qwen3_30B_A3B)
        let mixtral = Samples.parsed(Samples.mixtral8x7B)
        let deepSeek = Samples.parsed(Samples.deepSeekV3)

        let missing = failure(Samples.editing(qwen, "num_experts_per_tok", nil))
        #expect(missing?.name == "config.json: num_experts_per_tok")
        #expect(missing?.message == "missing; expected a positive integer")
        #expect(failure(Samples.editing(mixtral, "hidden_size", nil))?.name == "config.json: hidden_size")
        #expect(failure(Samples.editing(mixtral, "num_local_experts", nil))?.name == "config.json: num_local_experts")
        #expect(
            failure(Samples.editing(deepSeek, "moe_intermediate_size", nil))?.name
                == "config.json: moe_intermediate_size")

        let tooMany = failure(Samples.editing(mixtral, "num_experts_per_tok", .number(9)))
        #expect(tooMany?.name == "config.json: num_experts_per_tok")
        #expect(tooMany?.message == "k = 9 exceeds the 8 experts of num_local_experts")

        let wrongType = failure(Samples.editing(mixtral, "hidden_size", .string("4096")))
        #expect(wrongType?.name == "config.json: hidden_size")
        #expect(wrongType?.message == "expected a positive integer, got \"4096\"")

        let notDividing = failure(qwen, tp: 5)
        #expect(notDividing?.name == "config.json: moe_intermediate_size")
        #expect(
            notDividing?.message.hasPrefix("768 is not divisible by tp = 5; tp sizes that work: 1, 2, 3, 4, 6, 8")
                == true)

        let unaligned = failure(qwen, tp: 64)
        #expect(unaligned?.name == "config.json: moe_intermediate_size")
        #expect(unaligned?.message.hasPrefix("768 / tp = 64 is 12, not a multiple of 8") == true)
        #expect(failure(mixtral, tp: 3)?.name == "config.json: intermediate_size")

        let experts = failure(qwen, ep: 3)
        #expect(experts?.name == "config.json: num_experts")
        #expect(experts?.message == "128 experts are not divisible by ep = 3")
        #expect(failure(mixtral, ep: 8)?.message == "k = 2 exceeds the 1 local experts at ep = 8")

        #expect(failure(qwen, tp: 0)?.name == "tp")
        #expect(failure(qwen, ep: 0)?.name == "ep")

        let unknown = JSON.object([("model_type", .string("llama")), ("hidden_size", .number(4096))])
        #expect(failure(unknown)?.name == "config.json: model_type")
        #expect(
            failure(Samples.editing(deepSeek, "scoring_func", .string("tanh")))?.name == "config.json: scoring_func")
        #expect(failure(Samples.editing(deepSeek, "n_group", .number(3)))?.name == "config.json: n_group")
        #expect(failure(Samples.editing(deepSeek, "topk_group", .number(9)))?.name == "config.json: topk_group")
        #expect(failure(Samples.editing(deepSeek, "norm_topk_prob", .number(1)))?.name == "config.json: norm_topk_prob")
        #expect(failure(Samples.editing(mixtral, "hidden_act", .string("relu")))?.name == "config.json: hidden_act")
    }

    /// bench/models holds the MoE fields of public configs for `bench --model` (NOTES v37): each parses,
    /// to the shape its model publishes, and splits at the tp the notes bench it with.
    @Test(arguments: [
        ("qwen3-30b-a3b.json", 1, MoEModelConfig.Family.qwenMoE, 128, 8, 2048, 768),
        ("qwen1.5-moe-a2.7b.json", 1, .qwenMoE, 60, 4, 2048, 1408),
        ("deepseek-v2-lite.json", 1, .deepSeek, 64, 6, 2048, 1408),
        ("mixtral-8x22b.json", 8, .mixtral, 8, 2, 6144, 2048),
        ("kimi-k2.json", 8, .deepSeek, 384, 8, 7168, 256),
        ("qwen3-coder-480b-a35b.json", 8, .qwenMoE, 160, 8, 6144, 320),
    ])
    func benchModelsParse(file: String, tp: Int, family: MoEModelConfig.Family, e: Int, k: Int, h: Int, i: Int) throws {
        let root = String(#filePath).split(separator: "/", omittingEmptySubsequences: false).dropLast(3).joined(separator: "/")
        let config = try MoEModelConfig(contentsOf: root + "/bench/models/" + file, tensorParallel: tp)
        #expect(config.family == family)
        #expect(config.shape == (try MoEShape(experts: e, topK: k, hidden: h, intermediate: i)))
    }

    @Test func loadsFromAFileOrAModelFolder() throws {
        let folder = IOTestFolder()
        let path = folder.write(text: Samples.qwen3_30B_A3B, to: "config.json")
        let fromFile = try MoEModelConfig(contentsOf: path, tensorParallel: 4)
        #expect(fromFile.shape.intermediate == 192)
        let fromFolder = try MoEModelConfig(contentsOf: folder.path, tensorParallel: 4)
        #expect(fromFolder == fromFile)
        let preset = try ShapePreset.model(configPath: path, tensorParallel: 4, expertParallel: 2)
        #expect(preset.name == "Qwen3MoeForCausalLM tp=4 ep=2")
        #expect(preset.shape == (try MoEShape(experts: 64, topK: 8, hidden: 2048, intermediate: 192)))

        // Errors from a file name the file in the message.
        let bad = folder.write(text: "{\"model_type\": \"mixtral\"}", to: "bad.json")
        let error = caughtError { _ = try MoEModelConfig(contentsOf: bad) }
        #expect(
            error == .invalidArgument("config.json: hidden_size", "missing; expected a positive integer (in '\(bad)')"))
        let broken = folder.write(text: "{\"model_type\": ", to: "broken.json")
        guard case .malformedFile(broken, _) = caughtError({ _ = try MoEModelConfig(contentsOf: broken) }) else {
            Issue.record("malformed JSON must name the file")
            return
        }
        guard
            case .invalidArgument(let name, _) = caughtError({
                _ = try MoEModelConfig(contentsOf: folder.file("none.json"))
            }),
            name.hasSuffix("none.json")
        else {
            Issue.record("a missing file must be named")
            return
        }
    }
}
