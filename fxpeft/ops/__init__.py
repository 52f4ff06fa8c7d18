"""Custom operators that rewritten graphs call: dropout drawn as eager PyTorch draws it (:mod:`.dropout`) and
bitsandbytes linears as one op (:mod:`.quantized`)."""
