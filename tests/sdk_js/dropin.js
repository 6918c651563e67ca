// An app using the AWS SDK for JavaScript v3 exactly as it would against AWS KMS: no
// endpoint, region or credentials in the code. Under `enclave-agent run` the
// environment sends it to the agent. Decrypts argv[2] (a CiphertextBlob file), asks
// GenerateDataKey for argv[3] (a key ARN), prints one JSON line.
"use strict";
const fs = require("fs");
const { KMSClient, DecryptCommand, GenerateDataKeyCommand } = require("@aws-sdk/client-kms");

async function main() {
  const kms = new KMSClient({});
  const decrypted = await kms.send(
    new DecryptCommand({ CiphertextBlob: fs.readFileSync(process.argv[2]) }),
  );
  const dataKey = await kms.send(
    new GenerateDataKeyCommand({ KeyId: process.argv[3], KeySpec: "AES_256" }),
  );
  console.log(
    JSON.stringify({
      plaintext: Buffer.from(decrypted.Plaintext).toString(),
      dataKeyBytes: dataKey.Plaintext.length,
      dataKeyId: dataKey.KeyId,
    }),
  );
}

main().catch((error) => {
  console.error(`${error.name}: ${error.message}`);
  process.exit(1);
});
