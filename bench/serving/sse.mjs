// The server-sent events of an OpenAI streaming response: each `data: {...}` event's JSON, in
// order, until the stream ends (`data: [DONE]` and other lines are skipped). Shared by the
// serving benchmarks.
export async function* sseEvents(body) {
  const decoder = new TextDecoder();
  let buf = '';
  for await (const bytes of body) {
    buf += decoder.decode(bytes, { stream: true });
    let at;
    while ((at = buf.indexOf('\n\n')) >= 0) {
      const ev = buf.slice(0, at);
      buf = buf.slice(at + 2);
      if (ev.startsWith('data: ') && ev !== 'data: [DONE]') yield JSON.parse(ev.slice(6));
    }
  }
}
