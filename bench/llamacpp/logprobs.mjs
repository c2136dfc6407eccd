// Next-token log-probs of a GGUF under llama.cpp (node-llama-cpp's prebuilt CPU binary), for
// bench/gguf_llamacpp.py: reads {"gguf": path, "prompts": [[token ids], ...], "k": 5} on stdin
// and prints one JSON line per prompt: [[token id, log-prob], ...] at the last prompt position.
import {getLlama} from "node-llama-cpp";

const input = JSON.parse(await new Promise((ok) => {
  let s = ""; process.stdin.on("data", (d) => (s += d)); process.stdin.on("end", () => ok(s));
}));
const llama = await getLlama({gpu: false, build: "never", maxThreads: 2});
const model = await llama.loadModel({modelPath: input.gguf});
for (const ids of input.prompts) {
  const ctx = await model.createContext({contextSize: 512, threads: 2, batchSize: 128});
  const seq = ctx.getSequence();
  for await (const r of seq.evaluateWithMetadata(ids, {probabilities: true}, {temperature: 0})) {
    const top = [...r.probabilities.entries()].slice(0, input.k).map(([t, p]) => [t, Math.log(p)]);
    console.log(JSON.stringify(top));
    break;
  }
  await ctx.dispose();
}
