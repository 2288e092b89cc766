import Testing
@testable import FusedMoE

@Suite struct BFloat16Tests {
    @Test(arguments: [
        (Float(1.0), UInt16(0x3F80)),
        (Float(-2.0), UInt16(0xC000)),
        (Float(0.0), UInt16(0x0000)),
        (Float(-0.0), UInt16(0x8000)),
        (Float.infinity, UInt16(0x7F80)),
        (-Float.infinity, UInt16(0xFF80)),
        (Float(bitPattern: 0x3F80_8000), UInt16(0x3F80)),  // tie, even stays
        (Float(bitPattern: 0x3F81_8000), UInt16(0x3F82)),  // tie, odd rounds up to even
        (Float(bitPattern: 0x3F80_8001), UInt16(0x3F81)),  // just above the tie
        (Float(bitPattern: 0x3F80_7FFF), UInt16(0x3F80)),  // just below the tie
        (Float(bitPattern: 0x7F7F_FFFF), UInt16(0x7F80)),  // Float's max rounds past bf16's max: infinity
        (Float(bitPattern: 0x0000_0001), UInt16(0x0000)),  // smallest subnormal rounds to zero
        (Float(bitPattern: 0x0001_8000), UInt16(0x0002)),  // subnormal tie to even
    ])
    func roundsToNearestEven(value: Float, expected: UInt16) {
        #expect(BFloat16(value).bitPattern == expected, "\(value.bitPattern)")
    }

    @Test func nanStaysNaN() {
        #expect(BFloat16(Float.nan).isNaN)
        #expect(BFloat16(Float.nan).floatValue.isNaN)
        // A NaN whose payload lives only in the low half must not become infinity.
        let lowPayload = Float(bitPattern: 0x7F80_0001)
        #expect(lowPayload.isNaN)
        #expect(BFloat16(lowPayload).isNaN)
        #expect(BFloat16(-Float.nan).floatValue.isNaN)
    }

    @Test func everyBFloat16RoundTrips() {
        for bits in UInt16.min...UInt16.max {
            let value = BFloat16(bitPattern: bits)
            if value.isNaN {
                #expect(BFloat16(value.floatValue).isNaN)
            } else {
                #expect(BFloat16(value.floatValue).bitPattern == bits)
            }
        }
    }

    @Test func greatestFinite() {
        #expect(BFloat16.greatestFiniteMagnitude.floatValue == 3.3895314e38)
    }
}

@Suite struct DTypeAndTensorTests {
    @Test func dtypeNames() {
        #expect(DType(name: "bfloat16") == .bf16)
        #expect(DType(name: "half") == .fp16)
        #expect(DType(name: "float32") == .fp32)
        #expect(DType(name: "int8") == nil)
        #expect(DType.bf16.byteCount == 2 && DType.fp32.byteCount == 4)
    }

    @Test func tensorChecksCountAndShape() throws {
        #expect(throws: MoEError.self) { try HostTensor<Float>(shape: [2, 3], storage: [1, 2, 3]) }
        #expect(throws: MoEError.self) { try HostTensor<Float>(shape: [-1, 3], storage: []) }
        var tensor = try HostTensor<Float>(shape: [2, 3], storage: [0, 1, 2, 3, 4, 5])
        #expect(tensor.strides == [3, 1])
        #expect(tensor[1, 2] == 5)
        tensor[0, 1] = 9
        #expect(tensor.storage[1] == 9)
        let empty = try HostTensor<Float>(shape: [0, 4], storage: [])
        #expect(empty.count == 0)
    }

    @Test func float16RoundsLikeIEEE() {
        #expect(Float16(Float(65520)).isInfinite)
        #expect(Float16(Float(1) + Float(1) / 2048).floatValue == 1)  // tie to even
    }
}

@Suite struct JSONTests {
    @Test func roundTrip() throws {
        let text = #"{"a": [1, 2.5, -3e2, true, null], "b": {"c": "x\"y\\n\u0041"}}"#
        let value = try JSON.parse(text)
        #expect(value["a"] == .array([.number(1), .number(2.5), .number(-300), .bool(true), .null]))
        #expect(value["b"]?["c"]?.stringValue == "x\"y\\nA")
        #expect(try JSON.parse(value.serialized()) == value)
        #expect(try JSON.parse(value.serialized(indent: 2)) == value)
    }

    @Test(arguments: ["{", "[1,]", "{\"a\" 1}", "tru", "\"open", "{} x", ""])
    func malformedIsAnErrorWithAPlace(text: String) {
        do {
            _ = try JSON.parse(text, source: "cfg.json")
            Issue.record("'\(text)' parsed")
        } catch {
            guard case .malformedFile(let file, let message) = error else {
                Issue.record("wrong error \(error)")
                return
            }
            #expect(file == "cfg.json")
            #expect(message.contains("byte"))
        }
    }
}
