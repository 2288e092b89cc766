/// A JSON value with a small parser and writer, so the core needs no Foundation for configs and
/// result files.
public enum JSON: Hashable, Sendable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSON])
    /// Keys in the order they were written or parsed.
    case object([(String, JSON)])

    public static func == (lhs: JSON, rhs: JSON) -> Bool {
        switch (lhs, rhs) {
        case (.null, .null): true
        case (.bool(let a), .bool(let b)): a == b
        case (.number(let a), .number(let b)): a == b
        case (.string(let a), .string(let b)): a == b
        case (.array(let a), .array(let b)): a == b
        case (.object(let a), .object(let b)): a.count == b.count && zip(a, b).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: false
        }
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(serialized())
    }

    public subscript(key: String) -> JSON? {
        if case .object(let members) = self { return members.first { $0.0 == key }?.1 }
        return nil
    }

    public var doubleValue: Double? { if case .number(let value) = self { value } else { nil } }
    public var stringValue: String? { if case .string(let value) = self { value } else { nil } }
    public var intValue: Int? {
        guard let value = doubleValue, value == value.rounded(), abs(value) < 9e15 else { return nil }
        return Int(value)
    }

    // MARK: - Writing

    /// The value as JSON text; `indent` spaces per level (0: one line).
    public func serialized(indent: Int = 0) -> String {
        var text = ""
        write(into: &text, indent: indent, level: 0)
        return text
    }

    private func write(into text: inout String, indent: Int, level: Int) {
        let newline = indent > 0 ? "\n" : ""
        let pad = { (level: Int) in String(repeating: " ", count: indent * level) }
        switch self {
        case .null: text += "null"
        case .bool(let value): text += value ? "true" : "false"
        case .number(let value):
            if !value.isFinite {
                text += "null"
            } else if value == value.rounded() && abs(value) < 1e15 {
                text += String(Int64(value))
            } else {
                text += "\(value)"
            }
        case .string(let value): JSON.writeString(value, into: &text)
        case .array(let values):
            if values.isEmpty { text += "[]"; return }
            text += "[" + newline
            for (index, value) in values.enumerated() {
                text += pad(level + 1)
                value.write(into: &text, indent: indent, level: level + 1)
                text += (index + 1 < values.count ? "," : "") + newline
            }
            text += pad(level) + "]"
        case .object(let members):
            if members.isEmpty { text += "{}"; return }
            text += "{" + newline
            for (index, (key, value)) in members.enumerated() {
                text += pad(level + 1)
                JSON.writeString(key, into: &text)
                text += indent > 0 ? ": " : ":"
                value.write(into: &text, indent: indent, level: level + 1)
                text += (index + 1 < members.count ? "," : "") + newline
            }
            text += pad(level) + "}"
        }
    }

    private static func writeString(_ value: String, into text: inout String) {
        text += "\""
        for scalar in value.unicodeScalars {
            switch scalar {
            case "\"": text += "\\\""
            case "\\": text += "\\\\"
            case "\n": text += "\\n"
            case "\r": text += "\\r"
            case "\t": text += "\\t"
            default:
                if scalar.value < 0x20 {
                    let hex = String(scalar.value, radix: 16)
                    text += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    text.unicodeScalars.append(scalar)
                }
            }
        }
        text += "\""
    }

    // MARK: - Parsing

    /// Parses JSON text.
    /// - Throws: `MoEError.malformedFile(source, ...)` with the byte offset of the problem.
    public static func parse(_ text: String, source: String = "JSON") throws(MoEError) -> JSON {
        var parser = Parser(bytes: Array(text.utf8), source: source)
        let value = try parser.value()
        parser.skipSpace()
        guard parser.offset == parser.bytes.count else { throw parser.error("unexpected text after the value") }
        return value
    }

    private struct Parser {
        let bytes: [UInt8]
        let source: String
        var offset = 0

        init(bytes: [UInt8], source: String) {
            self.bytes = bytes
            self.source = source
        }

        func error(_ message: String) -> MoEError {
            .malformedFile(source, "\(message) at byte \(offset)")
        }

        mutating func skipSpace() {
            while offset < bytes.count, [0x20, 0x0A, 0x0D, 0x09].contains(bytes[offset]) { offset += 1 }
        }

        mutating func expect(_ literal: String) throws(MoEError) {
            let expected = Array(literal.utf8)
            guard offset + expected.count <= bytes.count, Array(bytes[offset..<(offset + expected.count)]) == expected
            else { throw error("expected '\(literal)'") }
            offset += expected.count
        }

        mutating func value() throws(MoEError) -> JSON {
            skipSpace()
            guard offset < bytes.count else { throw error("unexpected end of input") }
            switch bytes[offset] {
            case UInt8(ascii: "{"): return try object()
            case UInt8(ascii: "["): return try array()
            case UInt8(ascii: "\""): return .string(try string())
            case UInt8(ascii: "t"): try expect("true"); return .bool(true)
            case UInt8(ascii: "f"): try expect("false"); return .bool(false)
            case UInt8(ascii: "n"): try expect("null"); return .null
            default: return .number(try number())
            }
        }

        mutating func object() throws(MoEError) -> JSON {
            offset += 1
            var members: [(String, JSON)] = []
            skipSpace()
            if offset < bytes.count, bytes[offset] == UInt8(ascii: "}") { offset += 1; return .object(members) }
            while true {
                skipSpace()
                guard offset < bytes.count, bytes[offset] == UInt8(ascii: "\"") else { throw error("expected a key string") }
                let key = try string()
                skipSpace()
                try expect(":")
                members.append((key, try value()))
                skipSpace()
                guard offset < bytes.count else { throw error("unterminated object") }
                if bytes[offset] == UInt8(ascii: ",") { offset += 1; continue }
                if bytes[offset] == UInt8(ascii: "}") { offset += 1; return .object(members) }
                throw error("expected ',' or '}'")
            }
        }

        mutating func array() throws(MoEError) -> JSON {
            offset += 1
            var values: [JSON] = []
            skipSpace()
            if offset < bytes.count, bytes[offset] == UInt8(ascii: "]") { offset += 1; return .array(values) }
            while true {
                values.append(try value())
                skipSpace()
                guard offset < bytes.count else { throw error("unterminated array") }
                if bytes[offset] == UInt8(ascii: ",") { offset += 1; continue }
                if bytes[offset] == UInt8(ascii: "]") { offset += 1; return .array(values) }
                throw error("expected ',' or ']'")
            }
        }

        mutating func string() throws(MoEError) -> String {
            offset += 1
            var scalars = String.UnicodeScalarView()
            var raw: [UInt8] = []
            func flush() {
                scalars.append(contentsOf: String(decoding: raw, as: UTF8.self).unicodeScalars)
                raw.removeAll()
            }
            while offset < bytes.count {
                let byte = bytes[offset]
                offset += 1
                if byte == UInt8(ascii: "\"") {
                    flush()
                    return String(scalars)
                }
                if byte != UInt8(ascii: "\\") {
                    raw.append(byte)
                    continue
                }
                flush()
                guard offset < bytes.count else { break }
                let escape = bytes[offset]
                offset += 1
                switch escape {
                case UInt8(ascii: "n"): scalars.append("\n")
                case UInt8(ascii: "t"): scalars.append("\t")
                case UInt8(ascii: "r"): scalars.append("\r")
                case UInt8(ascii: "b"): scalars.append("\u{8}")
                case UInt8(ascii: "f"): scalars.append("\u{C}")
                case UInt8(ascii: "u"):
                    guard offset + 4 <= bytes.count,
                        let code = UInt32(String(decoding: bytes[offset..<(offset + 4)], as: UTF8.self), radix: 16)
                    else { throw error("bad \\u escape") }
                    offset += 4
                    scalars.append(Unicode.Scalar(code) ?? "\u{FFFD}")
                default: scalars.append(Unicode.Scalar(escape))
                }
            }
            throw error("unterminated string")
        }

        mutating func number() throws(MoEError) -> Double {
            let start = offset
            while offset < bytes.count, "+-0123456789.eE".utf8.contains(bytes[offset]) { offset += 1 }
            guard offset > start, let value = Double(String(decoding: bytes[start..<offset], as: UTF8.self)) else {
                offset = start
                throw error("expected a value")
            }
            return value
        }
    }
}
