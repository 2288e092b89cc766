print("fused-moe")
